"""An institution: its shard, its personal model, its local step. Plain Python, no Ray.

An institution never owns a torch module: its host lends it a working model, and what
persists between rounds (a personal model under ``isolated`` and ``ditto``, its own head
under ``fedper``, whether its data was already uploaded under ``pooled``) is kept as
numpy state, so a host can carry hundreds of institutions in flat memory.

A round here is the same for every scheme; what a scheme changes in it is its client half
(the plan's ``client``, a :class:`agents.schemes.base.Client` in the scheme's own file), whose
hooks are called at fixed points: where the step starts, which keys stay home, the step itself
and its extra loss terms, what is kept after it, what is added to the upload, what is scored.
Everything it keeps is this institution's persistent state (its personal model, SCAFFOLD's
control variate c_i), checkpointed and given back to a restarted host. Each random draw comes
from its own stream keyed by (seed, institution, round, stream), so none moves another's.

What the update then goes through before it leaves its host (the plan's ``send``: the client
halves of the scheme's wrappers, compression and secure aggregation's sealing) is the host's
to apply; compression's error-feedback residual is this institution's persistent state.

Behaviours (agents/behaviours.py) on the update happen here too: a free-rider skips its
local step and sends back what it received; ``sign_flip`` and ``scaled`` bend the honest
result before it is sent. Whatever the scheme asks to be uploaded but weights or a
gradient (data, nothing) is never bent.
"""

from __future__ import annotations

import hashlib
import time
from typing import Mapping

import numpy as np
import torch

from agents import behaviours
from agents.schemes import privacy
from agents.schemes.base import PLAIN, Client, Work
from sim.core import dp_sgd, stragglers
from sim.core.models import get_state, set_state
from sim.core.objective import Term
from sim.core.train import _to_tensors, evaluate, local_train, scheduled
from sim.core.types import InstitutionSpec, LocalPlan, RoundContext, Shard, State, TrainingSpec, Update, state_nbytes


def client_of(plan: LocalPlan) -> Client:
    """The client half a plan asks for (FedAvg's when it names none)."""
    return plan.client if plan.client is not None else PLAIN


def digest(state: State) -> str:
    """A digest of a model state's names and bytes: equal digests, the same model."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.hexdigest()


class Institution:
    """One member of the consortium and the local work it does each round."""

    def __init__(self, spec: InstitutionSpec, shard: Shard, *, training: TrainingSpec, seed: int, initial: State):
        self.spec = spec
        self.shard = shard
        self.training = training
        self.seed = seed
        self.personal: State = initial  # its own model; used by schemes whose plan says "personal"
        self.control: State = {}  # SCAFFOLD's c_i over trainable parameters; empty = zeros (never trained under it)
        self.residual: State = {}  # compression's error feedback (agents/wrappers/compression.py): what it dropped; empty = zeros
        self.uploaded_data = False
        self.dp_steps = 0  # DP-SGD steps taken so far: what its epsilon composes
        self.changed = False  # whether anything above moved away from its starting value
        self.public: np.ndarray | None = None  # data.public's inputs (no labels), for schemes that distil on them
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None  # its training shard in torch, made once

    def free_rides(self, plan: LocalPlan) -> bool:
        """Whether it skips this round's local step: a free-rider asked to send weights or a gradient."""
        return self.spec.behaviour == "free_rider" and plan.upload in ("weights", "gradient")

    def train(self, model: torch.nn.Module, ctx: RoundContext, global_state: State | None) -> Update:
        """Run this round's local step on ``model`` and return what crosses to the coordinator."""
        plan, shard, client = ctx.plan, self.shard, client_of(ctx.plan)
        global_state = client.received(self, global_state)
        start = client.start(self, plan, global_state)
        kept = client.kept(global_state) if global_state else ()
        if self.free_rides(plan):
            return self._free_ride(plan, client, ctx.round, global_state, start, kept)
        training = scheduled(self.training, ctx.round)
        t0 = time.perf_counter()
        if plan.upload == "data":
            # Data sharing: the shard itself crosses, once; nothing is trained locally.
            work = Work({} if self.uploaded_data else {"x": shard.x_train, "y": shard.y_train}, samples=shard.num_train)
            self.uploaded_data = self.changed = True
            payload = work.payload
        else:
            set_state(model, start)
            cap = stragglers.cap(ctx, self.spec.name)  # a partial straggler stops early
            work = client.local_step(self, model, start, training, (self.seed, self.spec.index, ctx.round), cap)
            client.after(self, model, plan, global_state, work, ctx.round, training)
            if plan.upload == "nothing":
                payload = {}
            else:  # an adversary bends its change from where it started (a gradient: the gradient itself)
                payload = behaviours.bend(self.spec, work.payload, {} if plan.upload == "gradient" else start)
            if plan.upload == "weights":
                payload = client.finish(self, start, payload, work, training)
        return Update(
            institution=self.spec.name,
            index=self.spec.index,
            state=payload,
            num_samples=work.samples,
            train_loss=work.loss,
            compute_seconds=time.perf_counter() - t0,
            bytes_up=state_nbytes(payload),
            samples_processed=work.processed,
            bytes_down=client.bytes_down(plan, global_state, kept),
            start_loss=work.start_loss,
            epsilon=self.epsilon(),
        )

    def sgd(self, model: torch.nn.Module, training: TrainingSpec, key: tuple[int, ...], cap: int | None,
            terms: tuple[Term, ...] = ()) -> Work:
        """Local SGD on the own shard from the model as set (DP-SGD when the institution is private), under the
        extra ``terms``; cut to ``cap`` minibatches for a partial straggler. What plain local training does."""
        shard = self.shard
        dp = dp_sgd.DpSgd(self.spec.dp_noise_multiplier, self.spec.dp_clip_norm) if self.spec.private else None
        loss, steps = local_train(model, shard.x_train, shard.y_train, training=training, key=key, terms=terms, dp=dp,
                                  max_steps=cap)
        if dp is not None:
            self.dp_steps, self.changed = self.dp_steps + steps, True
        work = Work(get_state(model), loss, steps, self.training.local_epochs * shard.num_train, shard.num_train)
        if cap is not None:
            work.processed = stragglers.processed(steps, shard.num_train, training)
            work.samples = stragglers.seen(steps, shard.num_train, training)
        return work

    def epsilon(self) -> float:
        """Its cumulative DP-SGD epsilon (dp-accounting's RDP accountant, see sim.core.dp_sgd); NaN without DP-SGD."""
        if not self.spec.private:
            return float("nan")
        q, _ = dp_sgd.schedule(max(1, self.shard.num_train), self.training.batch_size, self.training.local_epochs)
        return privacy.epsilon(self.spec.dp_noise_multiplier, q, self.dp_steps, self.spec.dp_delta)

    def _free_ride(self, plan: LocalPlan, client: Client, round: int, global_state: State | None, start: State | None,
                   kept: tuple[str, ...]) -> Update:
        """A free-rider's update: the model it received (a zero gradient), noise if it adds any; no compute spent."""
        if plan.upload == "gradient":
            sent = {k: np.zeros_like(v) for k, v in (start or {}).items() if k not in kept}
        else:
            sent = {k: v for k, v in (start or {}).items() if k not in kept}
        noise = float(getattr(self.spec, "behaviour_noise", 0.0))
        rng = np.random.default_rng([self.seed, self.spec.index, round, behaviours.FREE_RIDE_STREAM]) if noise > 0 else None
        payload = behaviours.free_ride(sent, noise, rng)
        return Update(
            institution=self.spec.name, index=self.spec.index, state=payload,
            num_samples=self.shard.num_train,  # what it claims, so a weighted mean gives its nothing full weight
            train_loss=float("nan"), compute_seconds=0.0, bytes_up=state_nbytes(payload), samples_processed=0,
            bytes_down=client.bytes_down(plan, global_state, kept),
        )

    def tensors(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Its training shard as tensors on the model's device and dtype: made on first use, then reused every round."""
        device = next(model.parameters()).device
        if self._tensors is None or self._tensors[0].device != device:
            self._tensors = _to_tensors(model, self.shard.x_train, self.shard.y_train)
        return self._tensors

    def trained(self, plan: LocalPlan, global_state: State | None, state: State, loss: float,
                seconds: float, steps: int | None = None) -> Update:
        """The update of a plain local step its host ran for it (vectorised with other institutions).

        Book-keeping is :meth:`train`'s for a batchable client half (no keys kept home, no second model, no extra
        upload); ``steps`` are the minibatches a partial straggler trained (None: its full local step).
        """
        n, client = self.shard.num_train, client_of(plan)
        global_state = client.received(self, global_state)
        start = client.start(self, plan, global_state)  # before a personal start is overwritten: an adversary bends from it
        if plan.start == "personal":
            self.personal, self.changed = state, True
        payload = behaviours.bend(self.spec, state, start) if plan.upload == "weights" else {}
        return Update(
            institution=self.spec.name, index=self.spec.index, state=payload,
            num_samples=n if steps is None else stragglers.seen(steps, n, self.training),
            train_loss=loss, compute_seconds=seconds, bytes_up=state_nbytes(payload),
            samples_processed=self.training.local_epochs * n if steps is None else
            stragglers.processed(steps, n, self.training),
            bytes_down=client.bytes_down(plan, global_state),
        )

    def persistent(self) -> dict[str, np.ndarray]:
        """What it carries from round to round, as flat numpy arrays (empty while nothing changed)."""
        if not self.changed:
            return {}
        return ({"uploaded_data": np.asarray(self.uploaded_data)}
                | ({"dp_steps": np.asarray(self.dp_steps)} if self.dp_steps else {})
                | {f"personal/{k}": v for k, v in self.personal.items()}
                | {f"control/{k}": v for k, v in self.control.items()}
                | {f"residual/{k}": v for k, v in self.residual.items()})

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        """Take back what :meth:`persistent` returned (after a restart or from a checkpoint)."""
        if saved:
            self.uploaded_data = bool(saved["uploaded_data"])
            self.dp_steps = int(saved.get("dp_steps", 0))
            self.personal = {k.removeprefix("personal/"): np.asarray(v) for k, v in saved.items() if k.startswith("personal/")}
            self.control = {k.removeprefix("control/"): np.asarray(v) for k, v in saved.items() if k.startswith("control/")}
            self.residual = {k.removeprefix("residual/"): np.asarray(v) for k, v in saved.items()
                             if k.startswith("residual/")}
            self.changed = True

    def evaluate(self, model: torch.nn.Module, plan: LocalPlan, global_state: State | None,
                 global_test: tuple[np.ndarray, np.ndarray] | None,
                 global_val: tuple[np.ndarray, np.ndarray] | None = None,
                 seen: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
        """Score the model this institution ends up with on its own test and validation splits (if personal, the global
        ones too). ``seen``: global scores already computed this round by digest of the model's state, so identical
        models (every institution's starting model, say) are scored on the global sets once."""
        client, personal = client_of(plan), plan.evaluate == "personal"
        global_state = client.received(self, global_state)
        scored = client.scored(self, plan, global_state)
        set_state(model, scored)
        client.adapt(self, model)  # fine-tuning schemes adapt the lent model first; what the institution carries stays
        acc, loss = evaluate(model, self.shard.x_test, self.shard.y_test, precision=self.training.precision)
        out = {"accuracy": acc, "loss": loss}
        if self.shard.y_val is not None and len(self.shard.y_val):  # what model selection may look at
            out["val_accuracy"], out["val_loss"] = evaluate(model, self.shard.x_val, self.shard.y_val,
                                                            precision=self.training.precision)
        if personal and global_test is not None and (plan.upload == "nothing" or not client.whole):
            # No complete merged model (nothing shared, or no shared head): the "global" row is
            # the mean of the institutions' own models.
            key = None if client.adapts or seen is None else digest(scored)
            if key is not None and key in seen:
                return out | seen[key]
            glob = {}
            glob["global_accuracy"], glob["global_loss"] = evaluate(model, *global_test, precision=self.training.precision)
            if global_val is not None and len(global_val[1]):
                glob["global_val_accuracy"], glob["global_val_loss"] = evaluate(model, *global_val,
                                                                                precision=self.training.precision)
            if key is not None:
                seen[key] = glob
            out |= glob
        return out
