"""Ditto: a FedAvg global model plus a personal model pulled towards it.

Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021. The global model w is trained exactly as FedAvg trains it;
each institution also keeps a personal model v and, every round it takes part, trains v
on its own shard minimising loss(v) + (lam/2)*||v - w||^2, with w the global model it
received that round (the paper's Algorithm 1). lam = 0 is local training alone; a large
lam holds v at w. Institutions are scored with v; the global row scores w.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agents.schemes.base import Client, Work, check_range, register
from agents.schemes.fedavg import FedAvg
from sim.core.models import get_state, set_state
from sim.core.objective import Pull
from sim.core.train import local_train
from sim.core.types import ConfigError, LocalPlan, State, TrainingSpec

if TYPE_CHECKING:
    import torch


@register("ditto")
class Ditto(FedAvg):
    """FedAvg for the global model; a personal model per institution trained with a proximal pull of weight ``lam``."""

    def __init__(self, *, lam: float = 0.1, **fedavg):
        super().__init__(**fedavg)
        self.lam = check_range("lam", lam, 0.0)

    def plan(self, round: int) -> LocalPlan:
        """FedAvg's local step, then the personal step with pull ``lam``; score the personal model."""
        return LocalPlan(evaluate="personal", client=DittoClient(self.lam))


PERSONAL_STREAM = 0xD1770
"""Fourth element of the RNG key of the personal training, apart from the global model's local training."""


@dataclass(frozen=True)
class DittoClient(Client):
    """Ditto's client half: after FedAvg's local step, train the personal model v with a pull towards w."""

    batchable = False  # it trains a second, personal model

    lam: float = 0.1

    def after(self, inst: Any, model: torch.nn.Module, plan: LocalPlan, global_state: State | None, work: Work,
              round: int, training: TrainingSpec) -> None:
        """Train v on the own shard minimising loss(v) + (lam/2)*||v - w||^2, w this round's global model."""
        super().after(inst, model, plan, global_state, work, round, training)
        if not global_state:
            return
        lr = inst.training.lr
        if self.lam * lr >= 2.0:
            # A gradient step scales v - w by (1 - lr*lam): beyond 2 it grows every step and v diverges.
            raise ConfigError("scheme.lam", f"lam * training.lr = {self.lam:g} * {lr:g} >= 2 makes the personal model "
                              f"diverge; use lam < {2.0 / lr:g} or a smaller training.lr")
        set_state(model, inst.personal)
        local_train(model, inst.shard.x_train, inst.shard.y_train, training=training,
                    key=(inst.seed, inst.spec.index, round, PERSONAL_STREAM), terms=(Pull(self.lam, global_state),))
        inst.personal, inst.changed = get_state(model), True
        work.processed += inst.training.local_epochs * inst.shard.num_train
