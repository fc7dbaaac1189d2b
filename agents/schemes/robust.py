"""Robust merging: pure functions over states that a few cheating or broken institutions cannot steer.

No Ray, no torch; the same conventions as :mod:`agents.schemes.aggregate`: maths in
float64, results cast back to each key's dtype (that of the first array seen), states
taken in the order given (scenario order), ties broken by that order.

- :func:`coordinate_median` and :func:`trimmed_mean`: Yin, Chen, Ramchandran, Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
- :func:`krum` (``m == 1``) and Multi-Krum (``m > 1``): Blanchard, El Mhamdi, Guerraoui,
  Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
- :func:`norm_clip`: each update's change to the global model bounded in L2 before the mean
  (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019).

Partial states are handled as :func:`~agents.schemes.aggregate.weighted_average` does:
per key, over the states that carry it. Krum compares whole updates, so its distances
run over the keys each pair shares; a key that none of the chosen updates carries is left
out of the result (the server step then keeps its global value).
Median, trimmed mean and Krum count every institution once, whatever sample count it
claims: a claim is exactly what a cheat can inflate.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from agents.schemes.aggregate import _cast, weighted_average
from sim.core.types import State


def _stacks(states: Sequence[State]) -> dict[str, tuple[np.ndarray, np.dtype]]:
    """Per key (first-seen order): the float64 stack of the arrays carrying it and the first array's dtype."""
    if len(states) == 0:
        raise ValueError("robust merging needs at least one state")
    out: dict[str, tuple[np.ndarray, np.dtype]] = {}
    for key in dict.fromkeys(k for s in states for k in s):
        arrays = [np.asarray(s[key]) for s in states if key in s]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"{key}: shapes disagree across states ({', '.join(map(str, sorted(shapes)))})")
        out[key] = (np.stack([a.astype(np.float64) for a in arrays]), arrays[0].dtype)
    return out


def coordinate_median(states: Sequence[State]) -> dict[str, np.ndarray]:
    """Per key and coordinate, the median over the states carrying the key (mean of the middle two when even)."""
    return {key: _cast(np.median(stack, axis=0), dtype) for key, (stack, dtype) in _stacks(states).items()}


def trimmed_mean(states: Sequence[State], beta: float) -> dict[str, np.ndarray]:
    """Per key and coordinate, drop the ``floor(beta * n)`` largest and smallest values, average the rest.

    ``n`` is the number of states carrying the key; ``beta`` must lie in [0, 0.5), so at
    least one value always remains. ``beta * n < 1`` trims nothing (the plain mean).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction must lie in [0, 0.5), got {beta}")
    out = {}
    for key, (stack, dtype) in _stacks(states).items():
        k = math.floor(beta * len(stack))
        kept = np.sort(stack, axis=0)[k:len(stack) - k]
        acc = np.zeros(stack.shape[1:], np.float64)
        for row in kept:  # summed in sorted order: no dependence on numpy's pairwise-sum blocking
            acc += row
        out[key] = _cast(acc / len(kept), dtype)
    return out


def krum_needs(byzantine: int) -> int:
    """Fewest updates Krum can work with when ``byzantine`` of them may lie: 2f + 3 (n > 2f + 2)."""
    return 2 * byzantine + 3


def krum_scores(states: Sequence[State], byzantine: int) -> np.ndarray:
    """Each state's Krum score: the sum of squared L2 distances to its ``n - f - 2`` nearest other states."""
    n = len(states)
    if n < krum_needs(byzantine):
        raise ValueError(f"Krum with f={byzantine} needs more than 2f+2={2 * byzantine + 2} updates, got {n}")
    dist = np.zeros((n, n), np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            shared = [k for k in states[i] if k in states[j]]
            d = 0.0
            for key in shared:
                diff = np.asarray(states[i][key], np.float64) - np.asarray(states[j][key], np.float64)
                d += float(np.dot(diff.ravel(), diff.ravel()))
            dist[i, j] = dist[j, i] = d
    nearest = n - byzantine - 2
    return np.array([np.sort(np.delete(dist[i], i))[:nearest].sum() for i in range(n)])


def krum_choice(states: Sequence[State], byzantine: int, m: int = 1) -> list[int]:
    """Positions of the ``m`` states with the lowest Krum scores, in the given order (ties: earlier first)."""
    n = len(states)
    if not 1 <= m <= n - byzantine:
        raise ValueError(f"Multi-Krum averages m in [1, n - f] = [1, {n - byzantine}] updates, got m={m}")
    order = np.argsort(krum_scores(states, byzantine), kind="stable")
    return sorted(int(i) for i in order[:m])


def krum(states: Sequence[State], byzantine: int, m: int = 1) -> dict[str, np.ndarray]:
    """Krum (``m == 1``): the state closest to its neighbours; Multi-Krum: the plain mean of the ``m`` best.

    Needs ``n > 2 * byzantine + 2`` states and ``1 <= m <= n - byzantine`` (ValueError otherwise).
    """
    chosen = [states[i] for i in krum_choice(states, byzantine, m)]
    return weighted_average(chosen, [1.0] * len(chosen))


def clip_delta(state: State, update: State, bound: float) -> dict[str, np.ndarray]:
    """``update`` moved back towards ``state`` so that its change (over the keys it carries) has L2 norm <= bound."""
    if not bound > 0:
        raise ValueError(f"clipping bound must be > 0, got {bound}")
    deltas = {}
    for key, array in update.items():
        if key not in state:
            raise ValueError(f"update has key {key!r} that the global state lacks")
        if np.shape(array) != np.shape(state[key]):
            raise ValueError(f"{key}: update shape {np.shape(array)} does not fit {np.shape(state[key])}")
        deltas[key] = np.asarray(array, np.float64) - np.asarray(state[key], np.float64)
    norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in deltas.values()))
    scale = 1.0 if norm <= bound else bound / norm
    return {key: _cast(np.asarray(state[key], np.float64) + scale * d, np.asarray(update[key]).dtype)
            for key, d in deltas.items()}


def norm_clip(state: State, states: Sequence[State], weights: Sequence[float], bound: float) -> dict[str, np.ndarray]:
    """Clip each state's change from ``state`` to L2 norm ``bound``, then take the weighted mean."""
    return weighted_average([clip_delta(state, s, bound) for s in states], weights)
