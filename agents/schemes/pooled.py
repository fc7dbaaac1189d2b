"""Pooled data: every institution hands its raw training data to one central trainer.

On the Ray backend the training can instead run data-parallel on Ray Train, one worker per
contributing institution (``trainer``; see :mod:`agents.runtime.ray_train`).

The centralised upper bound that federated learning approximates (the "centralized"
baseline of McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017). It costs the most privacy: all raw data crosses once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from agents.schemes.aggregate import concatenate
from agents.schemes.base import Scheme, Trainer, check_range, register, sample_cohort
from sim.core.types import ConfigError, LocalPlan, RoundContext, State, Update

AUTO, CENTRAL, RAY_TRAIN = "auto", "central", "ray_train"
TRAINERS = (AUTO, CENTRAL, RAY_TRAIN)
"""Who trains on the pool (``trainer``): the runtime acts on it (:mod:`agents.runtime.ray_train`)."""
POOLED_STREAM = 0x9001ED
"""Third element of the central trainer's RNG key, so its stream never collides with an institution's."""


@register("pooled")
class Pooled(Scheme):
    """Round 1: institutions upload raw data. Every round: the coordinator trains on the pool (or has Ray Train do it)."""

    def __init__(self, *, cohort_fraction: float = 1.0, trainer: str = "auto"):
        self.cohort_fraction = check_range("cohort_fraction", cohort_fraction, 0.0, 1.0, low_open=True)
        if trainer not in TRAINERS:  # the backend acts on it (agents/runtime/ray_train.py); checked here before any actor
            raise ConfigError("scheme.trainer", f"expected one of {', '.join(TRAINERS)}, got {trainer!r}")
        self.trainer = trainer
        self._trainer: Trainer | None = None
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # scenario index -> (x, y)
        self._pool: tuple[np.ndarray, np.ndarray] | None = None  # concatenation cache

    def bind(self, trainer: Trainer) -> None:
        """Keep the coordinator's central trainer."""
        self._trainer = trainer

    def plan(self, round: int) -> LocalPlan:
        """Upload raw training data (the institution side sends it only once)."""
        return LocalPlan(upload="data")

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """Round 1: the institutions that pool (a ``cohort_fraction`` sample); later rounds nobody works locally."""
        return sample_cohort(ctx, self.cohort_fraction) if ctx.round == 1 else ()

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """Add any data that arrived to the pool (scenario order), then train centrally one round's worth."""
        for u in updates:
            if "x" in u.state and "y" in u.state:  # re-sent data replaces, never duplicates
                self._shards[u.index] = (np.asarray(u.state["x"]), np.asarray(u.state["y"]))
                self._pool = None
        if not self._shards:
            return None
        if self._trainer is None:
            raise RuntimeError("pooled: no central trainer; the coordinator must call scheme.bind(trainer) first")
        if self._pool is None:
            pooled = concatenate([{"x": x, "y": y} for _, (x, y) in sorted(self._shards.items())])
            self._pool = (pooled["x"], pooled["y"])
        parts = tuple((i, len(y)) for i, (_, y) in sorted(self._shards.items()))  # whose rows, in pool order
        new_state, _loss = self._trainer(state, self._pool[0], self._pool[1], key=(ctx.seed, ctx.round, POOLED_STREAM),
                                         parts=parts)
        return new_state

    def state(self) -> dict[str, np.ndarray]:
        """The data handed over so far, by scenario index."""
        return {f"{i}/{part}": a for i, (x, y) in sorted(self._shards.items()) for part, a in (("x", x), ("y", y))}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Refill the pool from :meth:`state`."""
        indices = sorted({int(k.partition("/")[0]) for k in arrays})
        self._shards = {i: (np.asarray(arrays[f"{i}/x"]), np.asarray(arrays[f"{i}/y"])) for i in indices}
        self._pool = None
