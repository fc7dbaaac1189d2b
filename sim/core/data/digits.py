"""Handwritten digits: scikit-learn's 8x8 digits (1,797 images, 10 classes; no download).

Pixels are scaled to [0, 1] and shaped (1, 8, 8) so a CNN can take them as one channel.
The pool is split among institutions by ``data.partition`` (iid, dirichlet, quantity);
the file carries no writer ids, so there is no natural split.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sim.core.data.partition import (
    PARTITION, SMOKE, SPLIT, Pool, check_partition, partition, smoke_size, split_train_test, stream,
)
from sim.core.types import ConfigError, Scenario

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
    flat = _bundled()
    if flat is None:  # another layout of scikit-learn's files: its own loader (importing scikit-learn takes ~1 s)
        from sklearn.datasets import load_digits

        bunch = load_digits()
        flat = np.column_stack([bunch.data, bunch.target])
    x = (flat[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[:, None, :, :]  # pixel values are 0..16
    return x, flat[:, -1].astype(np.int64)


def _bundled() -> np.ndarray | None:
    """scikit-learn's ``datasets/data/digits.csv.gz`` (64 pixels then the label per row), read as ``load_digits`` reads
    it but without importing scikit-learn; None when the file is not where scikit-learn 1.x keeps it."""
    import importlib.util
    from pathlib import Path

    import pandas as pd

    found = importlib.util.find_spec("sklearn")  # locates the package without running it
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return None
    flat = pd.read_csv(path, header=None).to_numpy(dtype=np.float64)
    return flat if flat.shape == (POOL, 65) else None


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
