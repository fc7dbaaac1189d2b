"""The unlabeled public set that knowledge-distillation schemes (feddf, fedmd) score and distil on.

``data.public: {source: heldout, rows: N}`` takes N rows out of the institutions' training
rows, from each in proportion to its training rows (largest remainder), each drawn from its
own stream, before validation rows are held out. No institution trains, validates or tests
on them, and test splits, so the global test set, do not move: a run with the same
``data.public`` under any scheme (isolated, fedavg, ...) sees exactly the same shards, which
is what makes it a baseline. Only the inputs are kept; the labels of these rows are dropped
here and reach no scheme. ``null`` (the default) takes nothing: every existing run is unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from sim.core.data.partition import MIN_TRAIN, PUBLIC, apportion, stream
from sim.core.types import ConfigError, Scenario

SOURCES = ("heldout",)
KEYS = ("source", "rows")


def settings(data: Mapping[str, Any]) -> tuple[str, int] | None:
    """(source, rows) of ``data.public``, checked; None when there is no public set."""
    public = data.get("public")
    if public is None:
        return None
    if not isinstance(public, Mapping):
        raise ConfigError("data.public", f"expected {{source: heldout, rows: N}} or null, got {public!r}")
    unknown = sorted(set(public) - set(KEYS))
    if unknown:
        raise ConfigError(f"data.public.{unknown[0]}", f"unknown key; data.public takes {', '.join(KEYS)}")
    source, rows = public.get("source", "heldout"), public.get("rows")
    if source not in SOURCES:
        raise ConfigError("data.public.source", f"unknown source {source!r}; use heldout (rows no institution trains, "
                          "validates or tests on)")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError("data.public.rows", f"expected a whole number >= 1, got {rows!r}")
    return str(source), int(rows)


def carve(parts: Sequence[tuple[np.ndarray, np.ndarray]], rows: int, seed: int, scenario: Scenario,
          ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(pool indices of the public set, the institutions' (train, test) parts without them): ``rows`` training rows,
    taken from each institution in proportion to its training rows. ConfigError when an institution would keep too
    few to train."""
    sizes = np.array([len(train) for train, _ in parts])
    total = int(sizes.sum())
    if rows >= total:
        raise ConfigError("data.public.rows", f"asks for {rows} rows but the institutions hold {total} training rows "
                          "in all; lower it")
    take = apportion(sizes / total, rows)
    public, kept = [], []
    for spec, (train, test), k in zip(scenario.institutions, parts, take):
        if len(train) - k < MIN_TRAIN:
            raise ConfigError("data.public.rows", f"taking {rows} public rows leaves institution '{spec.name}' "
                              f"{len(train) - k} training rows; it needs at least {MIN_TRAIN}: lower data.public.rows")
        mask = np.zeros(len(train), dtype=bool)
        mask[stream(seed, PUBLIC, spec.index).choice(len(train), size=int(k), replace=False)] = True
        public.append(train[mask])
        kept.append((train[~mask], test))
    return np.concatenate(public), kept
