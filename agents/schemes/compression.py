"""Compression of an institution's upload: top-k sparsification and 8-bit quantisation, with error feedback.

Pure functions over flat ``name -> numpy array`` mappings; no Ray, no torch. What is
compressed is an institution's *change* to the global model (its weights minus the ones
it received), per array:

- ``topk``: the ``ceil(ratio * n)`` entries of largest magnitude (ties to the lower flat
  index, so the choice is deterministic), sent as ``<name>/values`` (the array's dtype) and
  ``<name>/idx`` (int32 flat indices, ascending). Aji & Heafield, "Sparse Communication for
  Distributed Gradient Descent", EMNLP 2017; Lin et al., "Deep Gradient Compression", ICLR 2018.
- ``int8``: symmetric linear quantisation, ``<name>/codes`` = rint(x / scale) in int8 [-127, 127]
  and ``<name>/scale`` = max|x| / 127 (float32), so every entry is off by at most scale / 2.
  Alistarh et al., "QSGD", NeurIPS 2017 (deterministic rounding here).

Error feedback (Seide et al., "1-Bit Stochastic Gradient Descent", Interspeech 2014;
Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019): what the compressor dropped
(the residual) is added to the next change before compressing, so the sum of what was sent
trails the sum of the true changes by the current residual only. The residual is the
institution's persistent state.

Arrays that are not floating point (integer buffers) are not changes: they travel whole
under their own name, as does any key the caller does not compress.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from agents.schemes.aggregate import _cast
from sim.core.types import State

METHODS = ("none", "topk", "int8")
VALUES, IDX, CODES, SCALE = "/values", "/idx", "/codes", "/scale"
INT8_MAX = 127  # symmetric codes: -127..127, so 0 is exact and the range is the same both ways


def kept(size: int, ratio: float) -> int:
    """Entries top-k keeps of an array of ``size``: ceil(ratio * size), at least one of a non-empty array.

    The product is rounded to 9 decimals before the ceiling so that 0.1 * 30 keeps 3, not 4.
    """
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(round(ratio * size, 9))))


def topk(values: np.ndarray, k: int) -> np.ndarray:
    """Flat indices (ascending, int32) of the ``k`` entries of largest magnitude; ties go to the lower index."""
    flat = np.abs(np.asarray(values).ravel())
    n = flat.size
    if k >= n:
        return np.arange(n, dtype=np.int32)
    if k <= 0:
        return np.zeros(0, np.int32)
    t = np.partition(flat, n - k)[n - k]  # the k-th largest magnitude
    above = np.flatnonzero(flat > t)
    ties = np.flatnonzero(flat == t)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int32)


def compress(change: State, method: str, ratio: float = 1.0) -> dict[str, np.ndarray]:
    """The wire form of ``change`` under ``method`` (``none``: the arrays themselves); non-floating arrays go whole."""
    if method not in METHODS:
        raise ValueError(f"unknown compression {method!r}; use one of {', '.join(METHODS)}")
    out: dict[str, np.ndarray] = {}
    for name, array in change.items():
        a = np.asarray(array)
        if method == "none" or not np.issubdtype(a.dtype, np.floating):
            out[name] = a
        elif method == "topk":
            idx = topk(a, kept(a.size, ratio))
            out[name + VALUES], out[name + IDX] = a.ravel()[idx], idx
        else:
            peak = float(np.max(np.abs(a))) if a.size else 0.0
            scale = np.float32(peak / INT8_MAX)
            codes = np.rint(a.astype(np.float64) / float(scale)) if scale > 0 else np.zeros(a.shape)
            out[name + CODES] = np.clip(codes, -INT8_MAX, INT8_MAX).astype(np.int8)
            out[name + SCALE] = np.asarray(scale, np.float32)
    return out


def decompress(payload: State, template: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(dense changes of the compressed arrays, every other payload entry as it came).

    ``template`` (the global state) gives each compressed array its shape and dtype; a
    change is looked for under each of its keys. Dense changes have the template's dtype.
    """
    changes: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name, like in template.items():
        like = np.asarray(like)
        if name + IDX in payload:
            dense = np.zeros(like.size, like.dtype)
            dense[np.asarray(payload[name + IDX], np.int64)] = payload[name + VALUES]
            changes[name] = dense.reshape(like.shape)
            used |= {name + IDX, name + VALUES}
        elif name + CODES in payload:
            codes = np.asarray(payload[name + CODES], np.float64)
            changes[name] = (codes * float(payload[name + SCALE])).astype(like.dtype).reshape(like.shape)
            used |= {name + CODES, name + SCALE}
    return changes, {k: np.asarray(v) for k, v in payload.items() if k not in used}


def restore(global_state: State, payload: State) -> dict[str, np.ndarray]:
    """The weights an upload stands for: global + change for each compressed array (float64 sum, cast back), the
    rest as sent. An uncompressed payload comes back unchanged."""
    changes, rest = decompress(payload, global_state)
    out = dict(rest)
    for name, change in changes.items():
        old = np.asarray(global_state[name])
        out[name] = _cast(old.astype(np.float64) + change.astype(np.float64), old.dtype)
    return out


def with_feedback(change: State, residual: Mapping[str, np.ndarray], method: str,
                  ratio: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(wire form of change + residual, the new residual: what compressing it dropped), per floating array.

    A missing residual is zero. The residual keeps each change's dtype.
    """
    corrected = {}
    for k, v in change.items():
        v = np.asarray(v)
        corrected[k] = (v.astype(np.float64) + np.asarray(residual[k], np.float64)).astype(v.dtype) if k in residual else v
    sent = compress(corrected, method, ratio)
    dense, _ = decompress(sent, corrected)
    left = {k: (corrected[k].astype(np.float64) - dense[k].astype(np.float64)).astype(corrected[k].dtype)
            for k in dense}
    return sent, left
