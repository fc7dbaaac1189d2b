"""FedAvgM: FedAvg with server momentum.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019; as a baseline in Reddi et al., "Adaptive Federated
Optimization", ICLR 2021. The cohort's mean minus the global model is a pseudo-gradient;
the server keeps a velocity v = momentum * v + delta and moves by server_lr * v.
"""

from __future__ import annotations

import numpy as np

from agents.schemes.base import check_range, register
from agents.schemes.fedavg import FedAvg
from agents.schemes.server_optimisers import momentum_step, pack, unpack
from sim.core.types import ConfigError, State


@register("fedavgm")
class FedAvgM(FedAvg):
    """FedAvg's mean, applied with server momentum; the velocity is kept in checkpoints."""

    def __init__(self, *, weighting: str = "samples", server_lr: float = 0.1, momentum: float = 0.9,
                 cohort_fraction: float = 1.0, secure_aggregation: bool = False, compression: str = "none",
                 compression_ratio: float = 0.1, error_feedback: bool = True):
        super().__init__(weighting=weighting, server_lr=server_lr, cohort_fraction=cohort_fraction,
                         secure_aggregation=secure_aggregation, compression=compression,
                         compression_ratio=compression_ratio, error_feedback=error_feedback)
        self.momentum = check_range("momentum", momentum, 0.0, 1.0)
        if self.momentum >= 1.0:  # the velocity would never forget a step
            raise ConfigError("scheme.momentum", f"must lie in [0, 1), got {momentum!r}")
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, state: State, target: State, lr: float) -> State:
        """v = momentum * v + (target - old); new = old + lr * v."""
        out, self.velocity = momentum_step(state, target, self.velocity, lr, self.momentum)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The server velocity, for checkpoints."""
        return pack(velocity=self.velocity)

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue with a checkpoint's velocity."""
        (self.velocity,) = unpack(arrays, "velocity")
