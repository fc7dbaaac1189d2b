"""An institution: its shard, its personal model, its local step. Plain Python, no Ray.

An institution never owns a torch module: its host lends it a working model, and what
persists between rounds (a personal model under ``isolated`` and ``ditto``, its own head
under ``fedper``, whether its data was already uploaded under ``pooled``) is kept as
numpy state, so a host can carry hundreds of institutions in flat memory.

Personalisation (the plan's ``personal_keys``, ``personal_mu`` and ``adapt_*`` fields)
happens here: which keys stay home, a second proximal training of a personal model, and
fine-tuning a throw-away copy before scoring. Each draws from its own RNG stream, keyed
by (seed, institution, round, stream), so none of them moves another's random numbers.

SCAFFOLD's control variate c_i (the plan's ``control``) is persistent state too, kept
here and restored like the personal model; q-FFL's loss of the received model (the
plan's ``start_loss``) is measured here before training.

What the update then goes through before it leaves its host (the plan's ``send``: the client
halves of the scheme's wrappers, compression and secure aggregation's sealing) is the host's
to apply; compression's error-feedback residual is this institution's persistent state.

Behaviours (agents/behaviours.py) on the update happen here too: a free-rider skips its
local step and sends back what it received; ``sign_flip`` and ``scaled`` bend the honest
result before it is sent. Whatever the scheme asks to be uploaded but weights or a
gradient (data, nothing) is never bent.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Mapping

import numpy as np
import torch

from agents import behaviours
from agents.schemes import privacy
from agents.schemes.scaffold import CHANGE
from sim.core import dp_sgd, stragglers
from sim.core.models import get_state, set_state
from sim.core.train import _to_tensors, evaluate, full_gradient, local_train, rng_for, scheduled
from sim.core.types import (ConfigError, InstitutionSpec, LocalPlan, RoundContext, Shard, State, TrainingSpec, Update,
                       state_nbytes)

PERSONAL_STREAM = 0xD1770
"""Fourth element of the RNG key of Ditto's personal training, apart from the global model's local training."""
ADAPT_STREAM = 0xADA97
"""Fourth element of the RNG key of adaptation before scoring (finetune, reptile)."""
HEAD_NAMES = ("classifier", "score", "head")
"""Module names transformers give a classification head; ``auto`` keeps all of such a head, not just its last layer."""


def control_nbytes(plan: LocalPlan) -> int:
    """Bytes of SCAFFOLD's server control c that come down with the global state (0 without it)."""
    return state_nbytes(plan.control) if plan.control is not None else 0


def personal_keys(plan: LocalPlan, state: State) -> tuple[str, ...]:
    """State keys an institution keeps to itself: those under ``plan.personal_keys`` prefixes, or with "auto" the head's."""
    names = list(state)
    if not plan.personal_keys or not names:
        return ()
    if plan.personal_keys == "auto":
        # state_dict order runs module by module, so the last floating key belongs to the last
        # layer with parameters: an MLP's output Linear, a transformer's classifier.
        last = next((k for k in reversed(names) if np.issubdtype(np.asarray(state[k]).dtype, np.floating)), names[-1])
        parts = last.split(".")[:-1]
        cut = next((i + 1 for i, p in enumerate(parts) if p in HEAD_NAMES), len(parts))
        module = ".".join(parts[:cut])
        if not module:  # parameters of the root module itself: all of them are its "last layer"
            return tuple(k for k in names if "." not in k)
        return tuple(k for k in names if k.startswith(module + "."))
    keys = tuple(k for k in names if k.startswith(tuple(plan.personal_keys)))
    if not keys:
        raise ConfigError("scheme.personal_keys", f"{list(plan.personal_keys)} match no key of the model state "
                          f"(keys look like {names[0]!r}); use auto or prefixes of those keys")
    return keys


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
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None  # its training shard in torch, made once

    def free_rides(self, plan: LocalPlan) -> bool:
        """Whether it skips this round's local step: a free-rider asked to send weights or a gradient."""
        return self.spec.behaviour == "free_rider" and plan.upload in ("weights", "gradient")

    def train(self, model: torch.nn.Module, ctx: RoundContext, global_state: State | None) -> Update:
        """Run this round's local step on ``model`` and return what crosses to the coordinator."""
        plan, shard = ctx.plan, self.shard
        start = self.start(plan, global_state)
        kept = personal_keys(plan, global_state) if global_state else ()
        if kept:  # FedPer: the shared part from the global model, the head its own
            start = {**global_state, **{k: self.personal[k] for k in kept}}
        if self.free_rides(plan):
            return self._free_ride(plan, ctx.round, global_state, start, kept)
        key = (self.seed, self.spec.index, ctx.round)
        training = scheduled(self.training, ctx.round)
        t0 = time.perf_counter()
        loss, samples_processed, start_loss, change = float("nan"), 0, float("nan"), {}
        cap, num_samples = stragglers.cap(ctx, self.spec.name), shard.num_train  # a partial straggler stops early
        if plan.upload == "data":
            # Data sharing: the shard itself crosses, once; nothing is trained locally.
            payload = {} if self.uploaded_data else {"x": shard.x_train, "y": shard.y_train}
            self.uploaded_data = self.changed = True
        else:
            set_state(model, start)
            if plan.one_step:
                payload, loss = full_gradient(model, shard.x_train, shard.y_train, precision=self.training.precision)
                samples_processed = shard.num_train
            else:
                if plan.start_loss:  # q-FFL: F_k, the received model's loss on the own training data
                    start_loss = evaluate(model, shard.x_train, shard.y_train, precision=self.training.precision)[1]
                anchor = start if plan.prox_mu > 0 else None
                correction = self._correction(model, plan.control) if plan.control is not None else None
                dp = dp_sgd.DpSgd(self.spec.dp_noise_multiplier, self.spec.dp_clip_norm) if self.spec.private else None
                loss, steps = local_train(
                    model, shard.x_train, shard.y_train, training=training, plan=plan, key=key, anchor=anchor,
                    correction=correction, dp=dp, max_steps=cap,
                )
                if dp is not None:
                    self.dp_steps, self.changed = self.dp_steps + steps, True
                samples_processed = self.training.local_epochs * shard.num_train
                if cap is not None:
                    samples_processed = stragglers.processed(steps, shard.num_train, training)
                    num_samples = stragglers.seen(steps, shard.num_train, training)
                payload = get_state(model)
            if kept:
                head = {k: payload.pop(k) for k in kept}  # never uploaded
                if not plan.one_step:
                    self.personal, self.changed = head, True
            elif plan.start == "personal" and not plan.one_step:
                self.personal, self.changed = get_state(model), True
            if plan.personal_mu is not None and global_state:
                self._train_personal(model, plan, global_state, ctx.round, training)
                samples_processed += self.training.local_epochs * shard.num_train
            if plan.upload == "nothing":
                payload = {}
            else:  # an adversary bends its change from where it started (a gradient: the gradient itself)
                payload = behaviours.bend(self.spec, payload, {} if plan.upload == "gradient" else start)
            if plan.control is not None and not plan.one_step and plan.upload == "weights":
                change = self._update_control(plan.control, start, payload, steps, training.lr)
                payload = {**payload, **{CHANGE + k: v for k, v in change.items()}}
        return Update(
            institution=self.spec.name,
            index=self.spec.index,
            state=payload,
            num_samples=num_samples,
            train_loss=loss,
            compute_seconds=time.perf_counter() - t0,
            bytes_up=state_nbytes(payload),
            samples_processed=samples_processed,
            bytes_down=received(plan, global_state, kept),
            start_loss=start_loss,
            epsilon=self.epsilon(),
        )

    def epsilon(self) -> float:
        """Its cumulative DP-SGD epsilon (dp-accounting's RDP accountant, see sim.core.dp_sgd); NaN without DP-SGD."""
        if not self.spec.private:
            return float("nan")
        q, _ = dp_sgd.schedule(max(1, self.shard.num_train), self.training.batch_size, self.training.local_epochs)
        return privacy.epsilon(self.spec.dp_noise_multiplier, q, self.dp_steps, self.spec.dp_delta)

    def _free_ride(self, plan: LocalPlan, round: int, global_state: State | None, start: State | None,
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
            bytes_down=received(plan, global_state, kept),
        )

    def _correction(self, model: torch.nn.Module, control: State) -> dict[str, np.ndarray]:
        """SCAFFOLD's gradient correction c - c_i over the trainable parameters (a missing variate is zero)."""
        out = {}
        for k, p in model.named_parameters():
            if p.requires_grad and (k in control or k in self.control):
                zero = np.zeros(tuple(p.shape), np.float32)
                out[k] = np.asarray(control.get(k, zero), np.float32) - np.asarray(self.control.get(k, zero), np.float32)
        return out

    def _update_control(self, control: State, start: State, sent: State, steps: int, lr: float) -> dict[str, np.ndarray]:
        """SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (K * lr) over the sent floating keys; returns c_i+ - c_i.

        ``x`` is the received model, ``y_i`` what is sent (after any behaviour), ``K`` the local steps taken.
        No steps (an empty shard) leaves c_i as it is.
        """
        if steps <= 0:
            return {}
        change = {}
        for k, y in sent.items():
            y = np.asarray(y)
            if not np.issubdtype(y.dtype, np.floating) or k not in start:
                continue
            drift = (np.asarray(start[k], np.float64) - y.astype(np.float64)) / (steps * lr)
            c = np.asarray(control.get(k, 0.0), np.float64)
            old = np.asarray(self.control.get(k, np.zeros_like(y)), np.float32)
            new = (old.astype(np.float64) - c + drift).astype(np.float32)
            change[k], self.control[k] = new - old, new
        self.changed = True
        return change

    def tensors(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Its training shard as tensors on the model's device and dtype: made on first use, then reused every round."""
        device = next(model.parameters()).device
        if self._tensors is None or self._tensors[0].device != device:
            self._tensors = _to_tensors(model, self.shard.x_train, self.shard.y_train)
        return self._tensors

    def start(self, plan: LocalPlan, global_state: State | None) -> State:
        """The state a plain local step starts from: its personal model or the global one."""
        return self.personal if plan.start == "personal" else global_state

    def trained(self, plan: LocalPlan, global_state: State | None, state: State, loss: float,
                seconds: float, steps: int | None = None) -> Update:
        """The update of a plain local step its host ran for it (vectorised with other institutions).

        Book-keeping is :meth:`train`'s for a plan without personal keys, personal training or one-step gradients;
        ``steps`` are the minibatches a partial straggler trained (None: its full local step).
        """
        n = self.shard.num_train
        start = self.start(plan, global_state)  # before a personal start is overwritten: an adversary bends from it
        if plan.start == "personal":
            self.personal, self.changed = state, True
        payload = behaviours.bend(self.spec, state, start) if plan.upload == "weights" else {}
        return Update(
            institution=self.spec.name, index=self.spec.index, state=payload,
            num_samples=n if steps is None else stragglers.seen(steps, n, self.training),
            train_loss=loss, compute_seconds=seconds, bytes_up=state_nbytes(payload),
            samples_processed=self.training.local_epochs * n if steps is None else
            stragglers.processed(steps, n, self.training),
            bytes_down=received(plan, global_state, ()),  # batchable plans keep no keys home and carry no controls
        )

    def _train_personal(self, model: torch.nn.Module, plan: LocalPlan, global_state: State, round: int,
                        training: TrainingSpec) -> None:
        """Ditto: train the personal model v on the own shard with the pull (mu/2)*||v - w||^2 to this round's global w."""
        lr, mu = self.training.lr, plan.personal_mu
        if mu * lr >= 2.0:
            # A gradient step scales v - w by (1 - lr*mu): beyond 2 it grows every step and v diverges.
            raise ConfigError("scheme.lam", f"lam * training.lr = {mu:g} * {lr:g} >= 2 makes the personal model "
                              f"diverge; use lam < {2.0 / lr:g} or a smaller training.lr")
        set_state(model, self.personal)
        local_train(model, self.shard.x_train, self.shard.y_train, training=training,
                    plan=LocalPlan(prox_mu=mu), key=(self.seed, self.spec.index, round, PERSONAL_STREAM),
                    anchor=global_state)
        self.personal, self.changed = get_state(model), True

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
                 global_val: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """Score the model this institution ends up with on its own test and validation splits (if personal, the global ones too)."""
        personal = plan.evaluate == "personal"
        kept = personal_keys(plan, global_state) if personal and global_state else ()
        if kept:  # FedPer: the merged shared part with its own head
            set_state(model, global_state)
            set_state(model, {k: self.personal[k] for k in kept})
        else:
            set_state(model, self.personal if personal else global_state)
        if plan.adapt_steps > 0 or plan.adapt_epochs > 0:
            self._adapt(model, plan)
        acc, loss = evaluate(model, self.shard.x_test, self.shard.y_test, precision=self.training.precision)
        out = {"accuracy": acc, "loss": loss}
        if self.shard.y_val is not None and len(self.shard.y_val):  # what model selection may look at
            out["val_accuracy"], out["val_loss"] = evaluate(model, self.shard.x_val, self.shard.y_val,
                                                            precision=self.training.precision)
        if personal and global_test is not None and (plan.upload == "nothing" or plan.personal_keys):
            # No complete merged model (nothing shared, or no shared head): the "global" row is
            # the mean of the institutions' own models.
            out["global_accuracy"], out["global_loss"] = evaluate(model, *global_test, precision=self.training.precision)
            if global_val is not None and len(global_val[1]):
                out["global_val_accuracy"], out["global_val_loss"] = evaluate(model, *global_val,
                                                                              precision=self.training.precision)
        return out

    def _adapt(self, model: torch.nn.Module, plan: LocalPlan) -> None:
        """Fine-tune the lent model on the own training data before scoring; what the institution carries is untouched."""
        x, y, n = self.shard.x_train, self.shard.y_train, self.shard.num_train
        if n == 0:
            return
        key = (self.seed, self.spec.index, plan.adapt_round, ADAPT_STREAM)
        training = replace(self.training, local_epochs=plan.adapt_epochs)
        if plan.adapt_epochs <= 0:
            # Exactly adapt_steps minibatches: that many batches' worth of fresh permutations,
            # trained as one epoch (a shard smaller than a batch is one batch per step, as in training).
            size = min(max(1, self.training.batch_size), n)
            rng, _ = rng_for((*key, 0))
            need = plan.adapt_steps * size
            idx = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
            x, y = x[idx], y[idx]
            training = replace(self.training, local_epochs=1, batch_size=size)
        local_train(model, x, y, training=training, plan=LocalPlan(), key=key)


def received(plan: LocalPlan, global_state: State | None, kept: tuple[str, ...]) -> int:
    """Bytes an institution receives in a round that starts from the global model: that model less the keys it keeps
    at home, plus SCAFFOLD's control variates; none when it starts from its own model."""
    if plan.start != "global":
        return 0
    model = state_nbytes(global_state) - state_nbytes({k: global_state[k] for k in kept}) if global_state else 0
    return model + control_nbytes(plan)
