"""The maths of merging: pure functions over states (flat ``name -> numpy array`` mappings).

No Ray, no torch. Sums are accumulated in float64 in the order given, then cast back to
each array's dtype, so a fixed order gives bit-identical results on any machine.

Partial sharing: an update may carry only some of the global state's keys (adapters,
base layers). Averages are taken per key over the updates that carry it, and the
server steps (:func:`server_step`, :func:`apply_gradient`) leave every key they are not
given at its previous global value.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sim.core.types import State


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float64 result back to ``dtype``, rounding (not truncating) for integer arrays."""
    if np.issubdtype(dtype, np.integer):
        value = np.rint(value)
    return value.astype(dtype, copy=False)


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Per-key weighted mean of ``states``; a key missing from some states is averaged over those that have it.

    Weights are renormalised per key. Each result keeps the dtype of the first array
    seen under its key. Raises ValueError for no states, mismatched lengths, negative
    weights, a key whose weights sum to zero, or shapes that disagree.
    """
    if len(states) == 0:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not np.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    keys = list(dict.fromkeys(k for s in states for k in s))  # first-seen order
    out: dict[str, np.ndarray] = {}
    for key in keys:
        acc: np.ndarray | None = None
        total, dtype, shape = 0.0, None, None
        for state, weight in zip(states, w):
            if key not in state:
                continue
            array = np.asarray(state[key])
            if acc is None:
                acc, dtype, shape = np.zeros(array.shape, np.float64), array.dtype, array.shape
            elif array.shape != shape:
                raise ValueError(f"{key}: shapes disagree across states ({shape} vs {array.shape})")
            acc += weight * array.astype(np.float64)
            total += weight
        if total <= 0:
            raise ValueError(f"{key}: weights of the states carrying it sum to zero")
        out[key] = _cast(acc / total, dtype)
    return out


def uniform_average(states: Sequence[State]) -> dict[str, np.ndarray]:
    """Per-key plain mean of ``states`` (every state counts once)."""
    return weighted_average(states, [1.0] * len(states))


def _check_subset(state: State, partial: State, what: str) -> None:
    """A partial state may only name keys (with the same shapes) that the global state has."""
    for key, array in partial.items():
        if key not in state:
            raise ValueError(f"{what} has key {key!r} that the global state lacks")
        if np.shape(array) != np.shape(state[key]):
            raise ValueError(f"{key}: {what} shape {np.shape(array)} does not fit {np.shape(state[key])}")


def server_step(state: State, target: State, lr: float = 1.0) -> dict[str, np.ndarray]:
    """Move ``state`` towards ``target``: new = old + lr * (target - old) on target's keys; other keys kept.

    ``lr == 1`` returns target's values exactly (plain FedAvg replacement).
    """
    _check_subset(state, target, "target")
    out = dict(state)
    for key, new in target.items():
        old = np.asarray(state[key])
        if lr == 1.0:
            out[key] = _cast(np.asarray(new, np.float64), old.dtype)
        else:
            old64 = old.astype(np.float64)
            out[key] = _cast(old64 + lr * (np.asarray(new, np.float64) - old64), old.dtype)
    return out


def apply_gradient(state: State, grad: State, lr: float) -> dict[str, np.ndarray]:
    """One gradient-descent step: new = old - lr * grad on grad's keys; other keys (buffers, frozen layers) kept."""
    _check_subset(state, grad, "gradient")
    out = dict(state)
    for key, g in grad.items():
        old = np.asarray(state[key])
        out[key] = _cast(old.astype(np.float64) - lr * np.asarray(g, np.float64), old.dtype)
    return out


def concatenate(states: Sequence[State]) -> dict[str, np.ndarray]:
    """Stack states along their first axis, key by key, in the given order (pooled raw data)."""
    if len(states) == 0:
        raise ValueError("concatenate needs at least one state")
    keys = list(states[0])
    for s in states:
        if set(s) != set(keys):
            raise ValueError(f"states carry different keys: {sorted(keys)} vs {sorted(s)}")
    return {k: np.concatenate([np.asarray(s[k]) for s in states], axis=0) for k in keys}
