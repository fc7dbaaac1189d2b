"""Handwritten digits: scikit-learn's 8x8 digits (1,797 images, 10 classes; no download).

Pixels are scaled to [0, 1] and shaped (1, 8, 8) so a CNN can take them as one channel.
The pool is split among institutions by ``data.partition`` (iid, dirichlet, quantity);
the file carries no writer ids, so there is no natural split.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sim.data.partition import (
    PARTITION, SMOKE, SPLIT, Pool, check_partition, partition, smoke_size, split_train_test, stream,
)
from sim.types import ConfigError, Scenario

DEFAULTS = {
    "name": "digits",
    "partition": "iid",
    "test_fraction": 0.2,
    "dirichlet_alpha": 0.5,
    "quantity_exponent": 1.5,
}
POOL = 1797  # images in sklearn's digits
NUM_CLASSES = 10


def load() -> tuple[np.ndarray, np.ndarray]:
    """All digits as x (n, 1, 8, 8) float32 in [0, 1] and y int64."""
    from sklearn.datasets import load_digits  # when asked: scikit-learn costs ~1 s to import, runs on other data need none

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # pixel values are 0..16
    return x, bunch.target.astype(np.int64)


def check(data: Mapping, scenario: Scenario) -> None:
    """Validate the partition keys and that every institution gets enough of the 1,797 images."""
    if data["partition"] == "natural":
        raise ConfigError("data.partition", "digits carry no writer or site ids, so there is no natural split; "
                          "choose one of iid, dirichlet, quantity")
    check_partition(data, scenario, POOL)


def build(data: Mapping, scenario: Scenario, seed: int, smoke: bool = False) -> Pool:
    """Split the digits among institutions by data.partition."""
    x, y = load()
    if smoke:
        keep = stream(seed, SMOKE).choice(len(y), smoke_size(scenario, data["test_fraction"], len(y)), replace=False)
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    shards = partition(y, NUM_CLASSES, data, scenario, stream(seed, PARTITION))
    parts = [
        split_train_test(idx, data["test_fraction"], stream(seed, SPLIT, spec.index))
        for spec, idx in zip(scenario.institutions, shards)
    ]
    return Pool(x, y, parts, NUM_CLASSES)
