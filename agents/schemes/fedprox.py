"""FedProx: FedAvg with a proximal term that keeps local training near the global model.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020. Each institution minimises loss + (mu/2)*||w - w_global||^2,
which limits client drift on skewed shards; the server step (its ``merge`` rule, its
``secure_aggregation``) is FedAvg's. Stragglers send partial work by default (``stragglers: partial``): the paper's
gamma-inexact local solutions, the local steps finished by ``engine.round_deadline_s``.
"""

from __future__ import annotations

from dataclasses import replace

from agents.schemes.base import check_range, register
from agents.schemes.fedavg import FedAvg
from sim.core.types import LocalPlan


@register("fedprox")
class FedProx(FedAvg):
    """FedAvg whose local objective adds (mu/2)*||w - w_global||^2."""

    def __init__(self, *, mu: float = 0.01, weighting: str = "samples", server_lr: float = 1.0, cohort_fraction: float = 1.0,
                 merge: str = "mean", trim: float = 0.2, byzantine: int = 1, krum_m: int = 1, clip_norm: float = 0.1,
                 secure_aggregation: bool = False, compression: str = "none", compression_ratio: float = 0.1,
                 error_feedback: bool = True, stragglers: str = "partial"):
        super().__init__(weighting=weighting, server_lr=server_lr, cohort_fraction=cohort_fraction, merge=merge, trim=trim,
                         byzantine=byzantine, krum_m=krum_m, clip_norm=clip_norm, secure_aggregation=secure_aggregation,
                         compression=compression, compression_ratio=compression_ratio, error_feedback=error_feedback,
                         stragglers=stragglers)
        self.mu = check_range("mu", mu, 0.0)

    def plan(self, round: int) -> LocalPlan:
        """Local SGD from the global model with the proximal weight ``mu``."""
        return replace(super().plan(round), prox_mu=self.mu)
