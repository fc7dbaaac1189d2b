"""Client-level differential privacy: pure functions over states, and the accountant's answers.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018 (DP-FedAvg). Each institution's change to the global model is clipped
to L2 norm ``clip_norm`` (over every floating-point key it sends, as one vector); the
coordinator sums the clipped changes, divides by the *expected* cohort size ``q * N``
(the paper's fixed-denominator estimator with every weight 1, so one institution moves
the sum by at most ``clip_norm / (q N)`` whatever the cohort drawn) and adds Gaussian noise
of std ``noise_multiplier * clip_norm / (q N)`` drawn from a stream seeded by (seed, round).

Privacy is counted by Google's maintained ``dp-accounting`` (its RDP accountant, the
add-or-remove-one neighbouring relation): ``rounds`` self-compositions of a Poisson-subsampled
Gaussian with sampling rate ``q``. No Ray, no torch; maths in float64, results cast back.
"""

from __future__ import annotations

import functools

import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

from agents.schemes.aggregate import _cast
from sim.core.types import State

NOISE_STREAM = 0xD9
"""Last element of the noise RNG key, so the noise never shares a stream with sampling, faults or training."""
MAX_NOISE = 1e4
"""Upper end of the noise multipliers the solver searches (a target needing more is refused)."""


def floating(state: State) -> list[str]:
    """Keys of ``state`` whose arrays are floating point (integer buffers are neither clipped nor noised)."""
    return [k for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def delta(global_state: State, update: State) -> dict[str, np.ndarray]:
    """The update's change to the global model (update - global) on its floating-point keys, in float64."""
    return {k: np.asarray(update[k], np.float64) - np.asarray(global_state[k], np.float64) for k in floating(update)}


def l2_norm(change: State) -> float:
    """L2 norm of all arrays of ``change`` taken together as one vector."""
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in change.values())))


def clip(change: State, clip_norm: float) -> dict[str, np.ndarray]:
    """``change`` scaled by ``min(1, clip_norm / ||change||)``: its L2 norm is at most ``clip_norm``."""
    norm = l2_norm(change)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: np.asarray(v, np.float64) * scale for k, v in change.items()}


def gaussian_noise(template: State, std: float, seed: int, round: int) -> dict[str, np.ndarray]:
    """Independent N(0, std^2) noise shaped like ``template``'s floating keys, from a stream fixed by (seed, round)."""
    rng = np.random.default_rng([seed, round, NOISE_STREAM])
    return {k: rng.standard_normal(np.shape(template[k])) * std for k in floating(template)}


def noised_mean(global_state: State, clipped: Sequence[State], denominator: float, noise: State) -> dict[str, np.ndarray]:
    """global + (sum of clipped changes) / denominator + noise, on the noise's keys, cast to the global dtypes.

    ``denominator`` is the expected cohort size ``q * N`` (fixed, not the number that arrived).
    """
    out = {}
    for key, z in noise.items():
        total = np.zeros(np.shape(global_state[key]), np.float64)
        for change in clipped:
            if key in change:
                total += change[key]
        old = np.asarray(global_state[key])
        out[key] = _cast(old.astype(np.float64) + total / denominator + z, old.dtype)
    return out


def noise_std(noise_multiplier: float, clip_norm: float, expected_cohort: float) -> float:
    """Std of the coordinator's noise on the mean change: ``noise_multiplier * clip_norm / (q N)``."""
    return noise_multiplier * clip_norm / expected_cohort


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence absl's per-order convergence warnings of the RDP accountant (they exclude an order, harmlessly)."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _event(noise_multiplier: float, sampling_rate: float, rounds: int) -> "dp_accounting.DpEvent":  # noqa: F821
    """``rounds`` releases of a Gaussian mechanism on a Poisson sample taken with probability ``sampling_rate``."""
    import dp_accounting  # imported when asked (it pulls in scipy.stats/signal: ~1 s a process that never uses DP)

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    once = gaussian if sampling_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(once, rounds)


@functools.lru_cache(maxsize=1024)  # pure; the pre-run check, the spec and the run ask the same questions
def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """The (epsilon, delta)-DP epsilon spent after ``rounds`` rounds, per dp-accounting's RDP accountant (0 before any)."""
    if rounds <= 0:
        return 0.0
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    with _quiet():
        accountant.compose(_event(noise_multiplier, sampling_rate, rounds))
        return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)  # pure and slow (seconds): solved once per process for each question
def solve_noise(target_epsilon: float, delta: float, sampling_rate: float, rounds: int) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``target_epsilon`` (dp-accounting's
    own calibration). Raises ValueError when even ``MAX_NOISE`` does not reach it."""
    import dp_accounting
    from dp_accounting import rdp

    with _quiet():
        return float(dp_accounting.calibrate_dp_mechanism(
            rdp.RdpAccountant, lambda z: _event(z, sampling_rate, rounds), target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE), tol=1e-4))
