"""Secure aggregation, simulated: pairwise additive masks that cancel in the sum, and what the protocol costs.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017. Pure functions,
no Ray, no torch, no cryptography: the key agreement is replaced by a seed per pair
derived from (seed, round, i, j) (the protocol's Diffie-Hellman shared secret), and
Shamir sharing by the coordinator recomputing a dropped member's seeds once the
survivors have sent their shares (the unmasking round), so the *arithmetic* is the
protocol's and the *bytes* are booked as if the cryptography ran.

The arithmetic is the real protocol's: each member encodes its vector in fixed point
(``FRACTION_BITS`` fractional bits) as integers modulo 2^64, adds ``mask_ij`` for every
other member j > i and subtracts ``mask_ji`` for every j < i (all mod 2^64, so a masked
vector is uniformly random on its own); the masks cancel in the sum over everyone. When
members drop out after the masks were agreed, the survivors' masks with them are
removed in the unmasking round; fewer than ``threshold(n)`` survivors lose the round.
Members are numbered 0..n-1 (:func:`members`: name order) among those that took part in key agreement.

:func:`seal` is the institution's side: its host turns the update into the masked vector
before it leaves the process (the wrapper :mod:`agents.wrappers.secagg` puts it in the round's plan), so the coordinator only ever receives and
adds up masked vectors; :func:`masked_sum` is the coordinator's side.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from agents.schemes import privacy
from sim.core.faults import FAILED
from sim.core.types import RoundContext, State, Update

FRACTION_BITS = 32
"""Fixed-point precision: values are rounded to multiples of 2^-32 (about 2.3e-10)."""
LIMIT = 2.0 ** (63 - FRACTION_BITS)
"""Largest magnitude a sum may reach before it wraps around the 2^64 ring (2^31)."""
WORD_BYTES = 8  # one masked coordinate on the wire (an integer mod 2^64)
KEY_BYTES = 32  # one public key, seed or Shamir share (X25519 / AES-128-sized, as in the paper's estimates)
CIPHERTEXT_BYTES = 2 * KEY_BYTES + 28  # ShareKeys: two shares (of b_u and s_u^SK) under AES-GCM (12-byte nonce, 16-byte tag)
ID_BYTES = 4  # one member id in the survivor list
EXTRA_ROUND_TRIPS = 3  # AdvertiseKeys, ShareKeys, Unmasking (the masked upload replaces the plain one)
MASK_STREAM = 0x5EC
"""Last element of the pair-seed RNG key, so masks never share a stream with training, sampling or noise."""
MASKED = "__masked__"
"""The one key of a sealed update's state: the masked vector (uint64 words)."""


def threshold(n: int) -> int:
    """Survivors the unmasking round needs (Shamir threshold t): an honest majority, n // 2 + 1."""
    return n // 2 + 1


def encode(values: np.ndarray) -> np.ndarray:
    """float64 values as fixed-point integers mod 2^64 (uint64). Raises ValueError beyond +-LIMIT."""
    values = np.asarray(values, np.float64)
    if values.size and not np.all(np.abs(values) < LIMIT):
        raise ValueError(f"secure aggregation: a value of magnitude >= {LIMIT:g} would wrap the 2^64 ring")
    return np.rint(values * 2.0**FRACTION_BITS).astype(np.int64).view(np.uint64)


def decode(words: np.ndarray) -> np.ndarray:
    """Fixed-point integers mod 2^64 back to float64 (two's complement: the upper half is negative)."""
    return np.asarray(words, np.uint64).view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS


def pair_mask(seed: int, round: int, i: int, j: int, size: int) -> np.ndarray:
    """The mask members i < j share this round: ``size`` uniform words from the seed (seed, round, i, j)."""
    if not i < j:
        raise ValueError(f"pair masks are indexed with i < j, got ({i}, {j})")
    return np.random.default_rng([seed, round, i, j, MASK_STREAM]).integers(
        0, np.iinfo(np.uint64).max, size=size, dtype=np.uint64, endpoint=True)


def mask(words: np.ndarray, i: int, n: int, seed: int, round: int) -> np.ndarray:
    """Member i's masked vector: words + sum_{j>i} mask_ij - sum_{j<i} mask_ji (mod 2^64), over members 0..n-1."""
    out = np.array(words, np.uint64, copy=True)
    for j in range(n):
        if j > i:
            out += pair_mask(seed, round, i, j, out.size)
        elif j < i:
            out -= pair_mask(seed, round, j, i, out.size)
    return out


def unmask_sum(masked: Mapping[int, np.ndarray], n: int, seed: int, round: int) -> np.ndarray:
    """The plain sum (float64) of the survivors' vectors from their masked vectors alone.

    ``masked`` maps each survivor's member number to its masked vector; members of 0..n-1
    missing from it dropped out after key agreement, and the masks survivors hold with them
    are recomputed from the seeds the unmasking round recovers and removed. Raises
    ValueError when fewer than :func:`threshold` survivors remain (the protocol aborts the round).
    """
    if len(masked) < threshold(n):
        raise ValueError(f"secure aggregation: {len(masked)} of {n} members survived, the protocol needs {threshold(n)}")
    survivors = sorted(masked)
    total = np.zeros_like(np.asarray(masked[survivors[0]], np.uint64))
    for s in survivors:
        total += np.asarray(masked[s], np.uint64)
    for d in (d for d in range(n) if d not in masked):
        for s in survivors:  # s added mask_sd if s < d, subtracted mask_ds if d < s: undo it
            if s < d:
                total -= pair_mask(seed, round, s, d, total.size)
            else:
                total += pair_mask(seed, round, d, s, total.size)
    return decode(total)


def flatten(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """The arrays under ``keys``, in that order, as one float64 vector."""
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in keys]) if keys else np.zeros(0)


def unflatten(vector: np.ndarray, template: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Split a vector made by :func:`flatten` back into float64 arrays shaped like ``template``'s."""
    out, at = {}, 0
    for k in keys:
        shape = np.shape(template[k])
        size = int(np.prod(shape))
        out[k] = vector[at:at + size].reshape(shape)
        at += size
    return out


def overhead(n: int, words: int, survived: bool) -> tuple[int, int]:
    """Extra (bytes up, bytes down) one member of an n-member round pays for secure aggregation.

    Every member: AdvertiseKeys (up 2 keys; down the other n-1 members' 2 keys each) and
    ShareKeys (up and down n-1 ciphertexts). A survivor also uploads its ``words``-word
    masked vector (``WORD_BYTES`` each; the caller subtracts the plain upload it replaces)
    and, in the unmasking round, receives the survivor list (n ids) and sends n-1 shares
    (of a dropped member's key or of a survivor's self-mask seed). A member that dropped
    out after ShareKeys pays only the first two rounds.
    """
    up = 2 * KEY_BYTES + (n - 1) * CIPHERTEXT_BYTES
    down = (n - 1) * (2 * KEY_BYTES + CIPHERTEXT_BYTES)
    if survived:
        up += words * WORD_BYTES + (n - 1) * KEY_BYTES
        down += n * ID_BYTES
    return up, down


def members(ctx: RoundContext) -> list[str]:
    """Who took part in the round's key agreement, in name order: the cohort plus members whose local step failed
    (they had agreed masks before dropping out); members offline from the start never joined."""
    return sorted(set(ctx.cohort) | {name for name, fault in ctx.dropped if fault == FAILED})


def seal(ctx: RoundContext, global_state: State, update: Update, *, weighting: str = "samples",
         clip: float = 0.0) -> Update:
    """The institution's side: ``update`` with its state replaced by its masked vector, ready to leave its host.

    The vector is its change to the global model over the global state's floating keys (clipped
    to ``clip`` when > 0), times its weight (its sample count, or 1 under ``weighting="uniform"``),
    then the weight; encoded in fixed point and masked with the round's pairwise masks. An update
    with nothing to send stays as it is.
    """
    if not update.state:
        return update
    keys = privacy.floating(global_state)
    missing = [k for k in keys if k not in update.state]
    if missing:
        raise ValueError(f"secure aggregation: {update.institution}'s update lacks {missing[0]!r}; every member must "
                         "send every key of the global state")
    change = {k: np.asarray(update.state[k], np.float64) - np.asarray(global_state[k], np.float64) for k in keys}
    if clip > 0:
        change = privacy.clip(change, clip)
    weight = 1.0 if weighting == "uniform" else float(update.num_samples)
    who = members(ctx)
    words = mask(encode(np.append(flatten(change, keys) * weight, weight)), who.index(update.institution), len(who),
                 ctx.seed, ctx.round)
    return replace(update, state={MASKED: words}, bytes_up=int(words.nbytes))


def masked_sum(ctx: RoundContext, global_state: State, updates: Sequence[Update]) -> tuple[dict[str, np.ndarray], float] | None:
    """The coordinator's side: (sum of the members' weighted changes, sum of their weights), read off the sealed
    updates alone (dropped members' masks removed); None when nothing arrived or too few survived to unmask."""
    sealed = [u for u in updates if u.state]
    if not sealed:
        return None
    plain = next((u.institution for u in sealed if set(u.state) != {MASKED}), None)
    if plain is not None:
        raise ValueError(f"secure aggregation: {plain}'s update arrived unmasked; its host must seal it (agents.wrappers.secagg.Seal)")
    who = members(ctx)
    masked = {who.index(u.institution): u.state[MASKED] for u in sealed}
    if len(masked) < threshold(len(who)):
        return None
    total = unmask_sum(masked, len(who), ctx.seed, ctx.round)
    keys = privacy.floating(global_state)
    return unflatten(total[:-1], {k: global_state[k] for k in keys}, keys), float(total[-1])
