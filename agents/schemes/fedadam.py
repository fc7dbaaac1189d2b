"""FedAdam: FedAvg's mean applied by an Adam-like server optimiser.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2). The cohort's mean minus the global model is a
pseudo-gradient delta; the server keeps m (mean of delta) and v (mean of delta^2) and moves
by server_lr * m / (sqrt(v) + tau). With ``tau`` far above |delta| (and v forgotten its start
tau^2: beta2 small, or many rounds) the step tends to (server_lr / tau) * m: server momentum.
"""

from __future__ import annotations

import numpy as np

from agents.schemes.base import check_range, register
from agents.schemes.fedavg import FedAvg
from agents.schemes.server_optimisers import adaptive_step, pack, unpack
from sim.core.types import ConfigError, State


@register("fedadam")
class FedAdam(FedAvg):
    """FedAvg's mean, applied with Adam on the server; its moments m and v are kept in checkpoints."""

    adaptive = "adam"  # the second-moment rule of server_optimisers.adaptive_step

    # Defaults from Reddi et al.: beta1 = 0.9, beta2 = 0.99, tau = 1e-3; server_lr = 0.01 is the paper's usual best
    # for FedAdam (its Table 8 grids), a per-coordinate step of at most ~0.01 per round.
    def __init__(self, *, weighting: str = "samples", server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, cohort_fraction: float = 1.0, secure_aggregation: bool = False,
                 compression: str = "none", compression_ratio: float = 0.1, error_feedback: bool = True):
        super().__init__(weighting=weighting, server_lr=server_lr, cohort_fraction=cohort_fraction,
                         secure_aggregation=secure_aggregation, compression=compression,
                         compression_ratio=compression_ratio, error_feedback=error_feedback)
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"scheme.{key}", f"must lie in [0, 1), got {value!r}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.tau = check_range("tau", tau, 0.0, low_open=True)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, state: State, target: State, lr: float) -> State:
        """One adaptive server step towards the cohort's mean."""
        out, (self.m, self.v) = adaptive_step(state, target, (self.m, self.v), rule=self.adaptive, lr=lr,
                                              beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The moments m and v, for checkpoints."""
        return pack(m=self.m, v=self.v)

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue with a checkpoint's moments."""
        self.m, self.v = unpack(arrays, "m", "v")
