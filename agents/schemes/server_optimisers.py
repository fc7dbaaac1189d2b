"""Server optimisers: pure steps over states that treat ``mean - global`` as a pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2 (FedAdam, FedYogi) and FedAvgM (Hsu, Qi, Brown,
"Measuring the Effects of Non-Identical Data Distribution", 2019). No Ray, no torch; maths
in float64, results cast back to each key's dtype as in :mod:`agents.schemes.aggregate`.

FedAvg takes its server optimiser as a parameter (FedJAX's ``server_optimizer``): :class:`SGD` (plain FedAvg),
:class:`Momentum` (FedAvgM), :class:`Adam` (FedAdam), :class:`Yogi` (FedYogi); each keeps its moments and saves
them for checkpoints. The steps themselves are the pure functions below.

The optimiser's moments are a state too (``name -> float64 array``), passed in and
returned, so a scheme can save them in checkpoints. Only floating-point keys are
optimised; integer buffers (counters) are replaced by the mean, as plain FedAvg does.
A key the mean does not carry keeps its global value and its moments.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from agents.schemes.aggregate import _cast, _check_subset, server_step
from agents.schemes.base import check_range
from sim.core.types import ConfigError, State

Moments = dict[str, np.ndarray]


def pseudo_gradient(state: State, target: State) -> dict[str, np.ndarray]:
    """delta = target - state (float64) on target's floating-point keys: the direction the cohort moved."""
    _check_subset(state, target, "target")
    return {k: np.asarray(t, np.float64) - np.asarray(state[k], np.float64)
            for k, t in target.items() if np.issubdtype(np.asarray(state[k]).dtype, np.floating)}


def _rest(state: State, target: State, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """State with the keys not optimised (integer buffers of target) replaced by target's values."""
    return server_step(state, {k: v for k, v in target.items() if k not in delta})


def momentum_step(state: State, target: State, velocity: Moments, lr: float, momentum: float
                  ) -> tuple[dict[str, np.ndarray], Moments]:
    """FedAvgM: v = momentum * v + delta; new = old + lr * v. Returns (new state, new velocity)."""
    delta = pseudo_gradient(state, target)
    out, vel = _rest(state, target, delta), dict(velocity)
    for k, d in delta.items():
        vel[k] = momentum * velocity.get(k, np.zeros_like(d)) + d
        old = np.asarray(state[k])
        out[k] = _cast(old.astype(np.float64) + lr * vel[k], old.dtype)
    return out, vel


def adaptive_step(state: State, target: State, moments: tuple[Moments, Moments], *, rule: str, lr: float,
                  beta1: float, beta2: float, tau: float) -> tuple[dict[str, np.ndarray], tuple[Moments, Moments]]:
    """FedAdam (``rule="adam"``) or FedYogi (``rule="yogi"``): one step of Reddi et al.'s Algorithm 2.

    m = beta1 * m + (1 - beta1) * delta;
    adam: v = beta2 * v + (1 - beta2) * delta^2;  yogi: v = v - (1 - beta2) * delta^2 * sign(v - delta^2);
    new = old + lr * m / (sqrt(v) + tau). Moments start at m = 0, v = tau^2 (the paper's v_{-1} >= tau^2);
    no bias correction, as in the paper. Returns (new state, (m, v)).
    """
    if rule not in ("adam", "yogi"):
        raise ValueError(f"unknown adaptive rule {rule!r}; use adam or yogi")
    delta = pseudo_gradient(state, target)
    out, (m, v) = _rest(state, target, delta), (dict(moments[0]), dict(moments[1]))
    for k, d in delta.items():
        m[k] = beta1 * moments[0].get(k, np.zeros_like(d)) + (1.0 - beta1) * d
        v0, d2 = moments[1].get(k, np.full_like(d, tau * tau)), d * d
        v[k] = beta2 * v0 + (1.0 - beta2) * d2 if rule == "adam" else v0 - (1.0 - beta2) * d2 * np.sign(v0 - d2)
        old = np.asarray(state[k])
        out[k] = _cast(old.astype(np.float64) + lr * m[k] / (np.sqrt(v[k]) + tau), old.dtype)
    return out, (m, v)


def pack(**groups: Moments) -> dict[str, np.ndarray]:
    """Moments as one flat checkpoint mapping: ``group/key -> array``."""
    return {f"{g}/{k}": a for g, named in groups.items() for k, a in named.items()}


def unpack(arrays: Mapping[str, np.ndarray], *groups: str) -> tuple[Moments, ...]:
    """The groups of :func:`pack` back, as float64 arrays (missing groups empty)."""
    out: dict[str, Moments] = {g: {} for g in groups}
    for name, a in arrays.items():
        g, _, k = name.partition("/")
        if g in out:
            out[g][k] = np.asarray(a, np.float64)
    return tuple(out[g] for g in groups)


class SGD:
    """The server's plain step towards the cohort's merged state: new = old + lr * (target - old) (FedAvg's)."""

    name = "sgd"

    def step(self, state: State, target: State, lr: float) -> dict[str, np.ndarray]:
        """One step from ``state`` towards ``target`` with rate ``lr``."""
        return server_step(state, target, lr)

    def state(self) -> dict[str, np.ndarray]:
        """What the optimiser carries between rounds, for checkpoints (plain SGD: nothing)."""
        return {}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Continue from what :meth:`state` returned."""


class Momentum(SGD):
    """Server momentum (FedAvgM): v = momentum * v + (target - old); new = old + lr * v."""

    name = "momentum"

    def __init__(self, momentum: float = 0.9):
        self.momentum = check_range("momentum", momentum, 0.0, 1.0)
        if self.momentum >= 1.0:  # the velocity would never forget a step
            raise ConfigError("scheme.momentum", f"must lie in [0, 1), got {momentum!r}")
        self.velocity: Moments = {}

    def step(self, state: State, target: State, lr: float) -> dict[str, np.ndarray]:
        """v = momentum * v + (target - old); new = old + lr * v."""
        out, self.velocity = momentum_step(state, target, self.velocity, lr, self.momentum)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The server velocity."""
        return pack(velocity=self.velocity)

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Continue with a checkpoint's velocity."""
        (self.velocity,) = unpack(arrays, "velocity")


class Adam(SGD):
    """Adam on the server (FedAdam, Reddi et al. 2021): m and v of the pseudo-gradient, step lr * m / (sqrt(v) + tau)."""

    name = "adam"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"scheme.{key}", f"must lie in [0, 1), got {value!r}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.tau = check_range("tau", tau, 0.0, low_open=True)
        self.m: Moments = {}
        self.v: Moments = {}

    def step(self, state: State, target: State, lr: float) -> dict[str, np.ndarray]:
        """One adaptive step towards ``target`` (:func:`adaptive_step` with this optimiser's rule)."""
        out, (self.m, self.v) = adaptive_step(state, target, (self.m, self.v), rule=self.name, lr=lr, beta1=self.beta1,
                                              beta2=self.beta2, tau=self.tau)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The moments m and v."""
        return pack(m=self.m, v=self.v)

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Continue with a checkpoint's moments."""
        self.m, self.v = unpack(arrays, "m", "v")


class Yogi(Adam):
    """Yogi's second moment on the server (FedYogi): v = v - (1 - beta2) * delta^2 * sign(v - delta^2)."""

    name = "yogi"


OPTIMISERS: dict[str, type[SGD]] = {o.name: o for o in (SGD, Momentum, Adam, Yogi)}
"""``scheme.server_optimizer`` -> its class (built with its default hyperparameters; fedavgm, fedadam and fedyogi set
their own)."""
