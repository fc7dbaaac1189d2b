"""Data-side misbehaviour: an institution's training split as ``noisy_labels`` or ``data_poisoning`` makes it.

Pure numpy functions, applied once by :func:`sim.core.data.build_federation` to a
misbehaving institution's training split (its test and validation splits untouched), so
they live with the data in the bottom layer; what an institution does to its *update*
(free-riding, sign flips) is the domain's, in :mod:`agents.behaviours`.

- ``noisy_labels`` flips a fraction ``label_noise`` of its training labels to another class;
- ``data_poisoning`` plants a backdoor (Gu et al. 2017, BadNets): a fraction ``poison_fraction``
  of its training rows get a trigger (their first ``trigger_features`` input elements set to
  ``trigger_value``) and the label ``target_label``. :func:`backdoor_success` measures how
  often a model obeys the trigger.

Every random draw comes from the institution's own stream keyed by (seed, purpose, institution).
"""

from __future__ import annotations

from typing import Any

import numpy as np

DATA_BEHAVIOURS = ("noisy_labels", "data_poisoning")
"""Behaviours that change an institution's training data, once, when the data is built."""
LABEL_NOISE_STREAM, POISON_STREAM = 0x1AB1E, 0xB4C
"""Purposes of the (seed, purpose, institution) streams of the data-side behaviours (apart from sim.core.data.partition's)."""


def half_up(fraction: float, n: int) -> int:
    """How many of ``n`` rows a fraction asks for, rounded half up (0.3 of 5 is 2, not banker's 2 or 1)."""
    return int(np.floor(fraction * n + 0.5))

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
