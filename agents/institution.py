"""An institution: its shard, its personal model, its local step. Plain Python, no Ray.

An institution never owns a torch module: its host lends it a working model, and what
persists between rounds (a personal model under ``isolated``, whether its data was
already uploaded under ``pooled``) is kept as numpy state, so a host can carry
hundreds of institutions in flat memory.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import torch

from sim.models import get_state, set_state
from sim.train import evaluate, full_gradient, local_train
from sim.types import InstitutionSpec, LocalPlan, RoundContext, Shard, State, TrainingSpec, Update, state_nbytes


class Institution:
    """One member of the consortium and the local work it does each round."""

    def __init__(self, spec: InstitutionSpec, shard: Shard, *, training: TrainingSpec, seed: int, initial: State):
        self.spec = spec
        self.shard = shard
        self.training = training
        self.seed = seed
        self.personal: State = initial  # its own model; used by schemes whose plan says "personal"
        self.uploaded_data = False
        self.changed = False  # whether anything above moved away from its starting value

    def train(self, model: torch.nn.Module, ctx: RoundContext, global_state: State | None) -> Update:
        """Run this round's local step on ``model`` and return what crosses to the coordinator."""
        plan, shard = ctx.plan, self.shard
        start = self.personal if plan.start == "personal" else global_state
        key = (self.seed, self.spec.index, ctx.round)
        t0 = time.perf_counter()
        loss, samples_processed = float("nan"), 0
        if plan.upload == "data":
            # Data sharing: the shard itself crosses, once; nothing is trained locally.
            payload = {} if self.uploaded_data else {"x": shard.x_train, "y": shard.y_train}
            self.uploaded_data = self.changed = True
        else:
            set_state(model, start)
            if plan.one_step:
                payload, loss = full_gradient(model, shard.x_train, shard.y_train)
                samples_processed = shard.num_train
            else:
                anchor = start if plan.prox_mu > 0 else None
                loss, steps = local_train(
                    model, shard.x_train, shard.y_train, training=self.training, plan=plan, key=key, anchor=anchor
                )
                samples_processed = self.training.local_epochs * shard.num_train
                payload = get_state(model)
            if plan.start == "personal" and not plan.one_step:
                self.personal, self.changed = get_state(model), True
            if plan.upload == "nothing":
                payload = {}
        return Update(
            institution=self.spec.name,
            index=self.spec.index,
            state=payload,
            num_samples=shard.num_train,
            train_loss=loss,
            compute_seconds=time.perf_counter() - t0,
            bytes_up=state_nbytes(payload),
            samples_processed=samples_processed,
            bytes_down=state_nbytes(global_state) if plan.start == "global" and global_state else 0,
        )

    def persistent(self) -> dict[str, np.ndarray]:
        """What it carries from round to round, as flat numpy arrays (empty while nothing changed)."""
        if not self.changed:
            return {}
        return {"uploaded_data": np.asarray(self.uploaded_data)} | {f"personal/{k}": v for k, v in self.personal.items()}

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        """Take back what :meth:`persistent` returned (after a restart or from a checkpoint)."""
        if saved:
            self.uploaded_data = bool(saved["uploaded_data"])
            self.personal = {k.removeprefix("personal/"): np.asarray(v) for k, v in saved.items() if k.startswith("personal/")}
            self.changed = True

    def evaluate(self, model: torch.nn.Module, plan: LocalPlan, global_state: State | None,
                 global_test: tuple[np.ndarray, np.ndarray] | None) -> dict[str, float]:
        """Score the model this institution ends up with on its own test split (and, if personal, the global one)."""
        personal = plan.evaluate == "personal"
        set_state(model, self.personal if personal else global_state)
        acc, loss = evaluate(model, self.shard.x_test, self.shard.y_test)
        out = {"accuracy": acc, "loss": loss}
        if personal and global_test is not None:
            # Without a merged model, the "global" row is the mean of the institutions' own models.
            out["global_accuracy"], out["global_loss"] = evaluate(model, *global_test)
        return out
