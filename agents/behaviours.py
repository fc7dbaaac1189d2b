"""How a misbehaving institution departs from an honest one: pure functions over numpy arrays, no Ray, no torch.

A scenario gives each institution a ``behaviour`` (``sim.schema.BEHAVIOURS``); an honest
one is untouched everywhere. Two kinds of misbehaviour:

- **on the update** (applied by :class:`agents.institution.Institution` to what it sends):
  ``free_rider`` trains nothing and sends back the model it received (plus Gaussian noise of
  std ``behaviour_noise``) while claiming its sample count; ``sign_flip`` sends
  global - scale * (its change) and ``scaled`` global + scale * (its change), the model
  poisoning of Bhagoji et al. (2019) and the sign-flipping attack of the Byzantine-robust
  literature (Karimireddy et al. 2022);
- **on the data** (applied once by ``sim.data.build_federation`` to its training split, the
  test and validation splits untouched): ``noisy_labels`` flips a fraction ``label_noise``
  of its training labels to another class; ``data_poisoning`` plants a backdoor (Gu et al.
  2017, BadNets): a fraction ``poison_fraction`` of its training rows get a trigger (their
  first ``trigger_features`` input elements set to ``trigger_value``) and the label
  ``target_label``. :func:`backdoor_success` measures how often a model obeys the trigger.

Every random draw comes from the institution's own stream keyed by the seed and its index
(and the round, for noise), so behaviours are the same on any placement and never move
another institution's numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.types import State

UPDATE_BEHAVIOURS = ("free_rider", "sign_flip", "scaled")
"""Behaviours that change what an institution sends."""
DATA_BEHAVIOURS = ("noisy_labels", "data_poisoning")
"""Behaviours that change an institution's training data, once, when the data is built."""
DIRECTION = {"sign_flip": -1.0, "scaled": 1.0}
"""Sign of the scaled change an adversary sends: global + DIRECTION * scale * (its change)."""
DEFAULT_SCALE = {"sign_flip": 1.0, "scaled": 10.0}
"""``scale`` when a row does not set it: a plain flip, or a boost ten times the honest change."""
FREE_RIDE_STREAM = 0xF4EE
"""Fourth element of the (seed, institution, round, stream) key of a free-rider's noise."""
LABEL_NOISE_STREAM, POISON_STREAM = 0x1AB1E, 0xB4C
"""Purposes of the (seed, purpose, institution) streams of the data-side behaviours (apart from sim.data.partition's)."""


def half_up(fraction: float, n: int) -> int:
    """How many of ``n`` rows a fraction asks for, rounded half up (0.3 of 5 is 2, not banker's 2 or 1)."""
    return int(np.floor(fraction * n + 0.5))


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


# --- on the data ---------------------------------------------------------------------


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``y`` with ``fraction`` of its labels (chosen by ``rng``) moved to another class, uniformly."""
    y = np.array(y, copy=True)
    k = half_up(fraction, len(y))
    rows = np.sort(rng.choice(len(y), size=k, replace=False))
    y[rows] = (y[rows] + rng.integers(1, num_classes, size=k)) % num_classes  # never the same class
    return y


def add_trigger(x: np.ndarray, features: int, value: float) -> np.ndarray:
    """A copy of ``x`` whose first ``features`` input elements (of each row, flattened) are ``value``."""
    x = np.array(x, copy=True)
    x.reshape(len(x), -1)[:, :features] = value  # a C-contiguous copy: the reshape is a view
    return x


def poison(x: np.ndarray, y: np.ndarray, fraction: float, features: int, value: float, target: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Copies of (x, y) with ``fraction`` of the rows triggered (:func:`add_trigger`) and labelled ``target``."""
    x, y = np.array(x, copy=True), np.array(y, copy=True)
    rows = np.sort(rng.choice(len(y), size=half_up(fraction, len(y)), replace=False))
    x[rows] = add_trigger(x[rows], features, value)
    y[rows] = target
    return x, y


def corrupt(spec: Any, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An institution's training split as its behaviour makes it (unchanged unless noisy_labels or data_poisoning)."""
    if spec.behaviour == "noisy_labels":
        rng = np.random.default_rng([int(seed), LABEL_NOISE_STREAM, spec.index])
        return x, flip_labels(y, spec.label_noise, num_classes, rng)
    if spec.behaviour == "data_poisoning":
        rng = np.random.default_rng([int(seed), POISON_STREAM, spec.index])
        return poison(x, y, spec.poison_fraction, spec.trigger_features, spec.trigger_value, spec.target_label, rng)
    return x, y


def backdoor_success(predicted: np.ndarray, true: np.ndarray, target: int) -> float:
    """Attack success rate: of the triggered test rows whose true label is not ``target``, the share predicted as it.

    ``predicted`` are a model's predictions on ``add_trigger(x_test, ...)``; NaN when every row is of the target class.
    """
    victims = np.asarray(true) != target
    return float(np.mean(np.asarray(predicted)[victims] == target)) if victims.any() else float("nan")
