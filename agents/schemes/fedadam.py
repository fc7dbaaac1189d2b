"""FedAdam: FedAvg's mean applied by an Adam-like server optimiser.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2). The cohort's mean minus the global model is a
pseudo-gradient delta; the server keeps m (mean of delta) and v (mean of delta^2) and moves
by server_lr * m / (sqrt(v) + tau) (:class:`agents.schemes.server_optimisers.Adam`, kept in
checkpoints). With ``tau`` far above |delta| (and v forgotten its start tau^2: beta2 small, or
many rounds) the step tends to (server_lr / tau) * m: server momentum. Defaults from the paper:
beta1 = 0.9, beta2 = 0.99, tau = 1e-3; conf/scheme/fedadam.yaml sets server_lr = 0.01, the
paper's usual best for FedAdam (its Table 8 grids).
"""

from __future__ import annotations

from typing import ClassVar

from agents.schemes.base import register
from agents.schemes.fedavg import FedAvg
from agents.schemes.server_optimisers import Adam


@register("fedadam")
class FedAdam(FedAvg):
    """FedAvg whose server optimiser is Adam; every other keyword is FedAvg's."""

    adaptive: ClassVar[type[Adam]] = Adam  # the server optimiser's class (FedYogi: Yogi)

    def __init__(self, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **fedavg):
        super().__init__(server_optimizer=self.adaptive(beta1, beta2, tau), **fedavg)
