"""Ditto: a FedAvg global model plus a personal model pulled towards it.

Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021. The global model w is trained exactly as FedAvg trains it;
each institution also keeps a personal model v and, every round it takes part, trains v
on its own shard minimising loss(v) + (lam/2)*||v - w||^2, with w the global model it
received that round (the paper's Algorithm 1). lam = 0 is local training alone; a large
lam holds v at w. Institutions are scored with v; the global row scores w.
"""

from __future__ import annotations

from agents.schemes.base import check_range, register
from agents.schemes.fedavg import FedAvg
from sim.core.types import LocalPlan


@register("ditto")
class Ditto(FedAvg):
    """FedAvg for the global model; a personal model per institution trained with a proximal pull of weight ``lam``."""

    def __init__(self, *, lam: float = 0.1, **fedavg):
        super().__init__(**fedavg)
        self.lam = check_range("lam", lam, 0.0)

    def plan(self, round: int) -> LocalPlan:
        """FedAvg's local step, then the personal step with pull ``lam``; score the personal model."""
        return LocalPlan(personal_mu=self.lam, evaluate="personal")
