"""How a misbehaving institution departs from an honest one: pure functions over numpy arrays, no Ray, no torch.

A scenario gives each institution a ``behaviour`` (``sim.core.schema.BEHAVIOURS``); an honest
one is untouched everywhere. Two kinds of misbehaviour:

- **on the update** (applied by :class:`agents.institution.Institution` to what it sends):
  ``free_rider`` trains nothing and sends back the model it received (plus Gaussian noise of
  std ``behaviour_noise``) while claiming its sample count; ``sign_flip`` sends
  global - scale * (its change) and ``scaled`` global + scale * (its change), the model
  poisoning of Bhagoji et al. (2019) and the sign-flipping attack of the Byzantine-robust
  literature (Karimireddy et al. 2022);
- **on the data** (``noisy_labels``, ``data_poisoning``): the bottom layer's
  :mod:`sim.core.data.corruption`, applied once when the data is built.

Every random draw comes from the institution's own stream keyed by the seed and its index
(and the round, for noise), so behaviours are the same on any placement and never move
another institution's numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.core.types import State

UPDATE_BEHAVIOURS = ("free_rider", "sign_flip", "scaled")
"""Behaviours that change what an institution sends."""
DIRECTION = {"sign_flip": -1.0, "scaled": 1.0}
"""Sign of the scaled change an adversary sends: global + DIRECTION * scale * (its change)."""
DEFAULT_SCALE = {"sign_flip": 1.0, "scaled": 10.0}
"""``scale`` when a row does not set it: a plain flip, or a boost ten times the honest change."""
FREE_RIDE_STREAM = 0xF4EE
"""Fourth element of the (seed, institution, round, stream) key of a free-rider's noise."""


# --- on the update -------------------------------------------------------------------


def free_ride(received: State, noise: float, rng: np.random.Generator | None) -> State:
    """What a free-rider sends: the state it received, as is or plus N(0, noise^2) on its floating arrays."""
    out = {}
    for k, v in received.items():
        a = np.asarray(v)
        if noise > 0 and np.issubdtype(a.dtype, np.floating):
            out[k] = (a + rng.normal(0.0, noise, size=a.shape)).astype(a.dtype)
        else:
            out[k] = a.copy()
    return out


def adversarial(sent: State, reference: State, factor: float) -> State:
    """``reference + factor * (sent - reference)`` per floating array (a missing reference key counts as 0).

    With ``reference`` the model it started from and ``sent`` its honestly trained model,
    factor -1 is a sign flip and factor 10 a tenfold boost; a gradient (reference empty)
    is simply multiplied. Integer arrays (counters) pass unchanged.
    """
    out = {}
    for k, v in sent.items():
        a = np.asarray(v)
        if not np.issubdtype(a.dtype, np.floating):
            out[k] = a
            continue
        ref = np.asarray(reference[k], dtype=np.float64) if k in reference else 0.0
        out[k] = (ref + factor * (a.astype(np.float64) - ref)).astype(a.dtype)
    return out


def factor(spec: Any) -> float:
    """The factor an adversarial institution multiplies its change by (1 for everybody else)."""
    if spec.behaviour not in DIRECTION:
        return 1.0
    scale = getattr(spec, "scale", None)
    return DIRECTION[spec.behaviour] * (DEFAULT_SCALE[spec.behaviour] if scale is None else float(scale))


def bend(spec: Any, payload: State, reference: State) -> State:
    """What ``spec``'s institution sends instead of its honest ``payload`` (the same object when it is honest)."""
    if spec.behaviour not in DIRECTION or not payload:
        return payload
    return adversarial(payload, reference, factor(spec))
