"""FedProx: FedAvg with a proximal term that keeps local training near the global model.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020. Each institution minimises loss + (mu/2)*||w - w_global||^2,
which limits client drift on skewed shards; the server step is FedAvg's (and so every
wrapper FedAvg takes: robust rules, secure aggregation, compression, client-level DP). Stragglers send partial work by default (``stragglers: partial``): the paper's
gamma-inexact local solutions, the local steps finished by ``engine.round_deadline_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agents.schemes.base import Client, check_range, register
from agents.schemes.fedavg import FedAvg
from sim.core.types import LocalPlan


@register("fedprox")
class FedProx(FedAvg):
    """FedAvg whose local objective adds (mu/2)*||w - w_global||^2."""

    stragglers = "partial"  # the paper's gamma-inexact solutions: a late institution sends the steps it finished

    def __init__(self, *, mu: float = 0.01, **fedavg):
        super().__init__(**fedavg)
        self.mu = check_range("mu", mu, 0.0)

    def plan(self, round: int) -> LocalPlan:
        """Local SGD from the global model with the proximal weight ``mu``."""
        return replace(super().plan(round), client=ProxClient(self.mu))


@dataclass(frozen=True)
class ProxClient(Client):
    """FedProx's client half: local SGD on loss + (mu/2)*||w - w_global||^2 (a pull towards the start)."""

    mu: float = 0.01

    def pull(self) -> float:
        """The proximal weight; the vectorised step batches it across institutions."""
        return self.mu
