"""FedAvgM: FedAvg with server momentum.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019; as a baseline in Reddi et al., "Adaptive Federated
Optimization", ICLR 2021. The cohort's mean minus the global model is a pseudo-gradient;
the server keeps a velocity v = momentum * v + delta and moves by server_lr * v
(:class:`agents.schemes.server_optimisers.Momentum`, kept in checkpoints).
"""

from __future__ import annotations

from agents.schemes.base import register
from agents.schemes.fedavg import FedAvg
from agents.schemes.server_optimisers import Momentum


@register("fedavgm")
class FedAvgM(FedAvg):
    """FedAvg whose server optimiser is momentum; every other keyword is FedAvg's."""

    def __init__(self, *, momentum: float = 0.9, **fedavg):
        super().__init__(server_optimizer=Momentum(momentum), **fedavg)
