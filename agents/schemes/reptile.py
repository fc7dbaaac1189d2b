"""Federated Reptile: meta-learn a global model that adapts to each institution in a few steps.

Nichol, Achiam, Schulman, "On First-Order Meta-Learning Algorithms" (Reptile),
arXiv:1803.02999, 2018, run federated as in Jiang, Konečný, Rush, Kannan, "Improving
Federated Learning Personalization via Model Agnostic Meta Learning", arXiv:1909.12488,
2019: institutions run local SGD from the global model (Reptile's inner loop) and the
server moves only part of the way towards their mean, new = old + server_lr * (mean - old)
with server_lr < 1 (Reptile's outer step size). Each institution is scored after
``adapt_steps`` SGD steps on its own data from the meta-model, the use it is trained for.
"""

from __future__ import annotations

from __future__ import annotations

from agents.schemes.base import check_range, register
from agents.schemes.fedavg import FedAvg
from agents.schemes.finetune import AdaptClient, check_count
from sim.core.types import LocalPlan


@register("reptile")
class Reptile(FedAvg):
    """FedAvg with an outer step ``server_lr`` < 1; scored after ``adapt_steps`` local steps."""

    def __init__(self, *, adapt_steps: int = 1, **fedavg):
        super().__init__(**{"server_lr": 0.5, **fedavg})  # Reptile's outer step: half way by default
        check_range("server_lr", self.server_lr, 0.0, 1.0, low_open=True)  # beyond 1 overshoots the mean: no meta-step
        self.adapt_steps = check_count("adapt_steps", adapt_steps)

    def plan(self, round: int) -> LocalPlan:
        """FedAvg's local step; scoring adapts a copy of the meta-model first, drawing from this round's stream."""
        return LocalPlan(client=AdaptClient(self.adapt_steps, 0, round))
