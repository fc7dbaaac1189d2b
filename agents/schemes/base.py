"""The scheme protocol and its registry.

A scheme decides *who* trains each round (``select``), *what* local training looks
like (``plan``) and *how* updates become the next global state (``merge``). The maths
of merging lives in :mod:`agents.schemes.aggregate`; a scheme only decides.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np

from sim.core.types import ConfigError, InstitutionSpec, LocalPlan, RoundContext, State, Update

SCHEMES: dict[str, type["Scheme"]] = {}
"""Registry: config name (== yaml file name in conf/scheme/) -> scheme class."""


def register(name: str) -> Callable[[type], type]:
    """Class decorator that registers a scheme under its config name."""

    def wrap(cls: type) -> type:
        if name in SCHEMES:
            raise ValueError(f"scheme {name!r} registered twice")
        cls.name = name
        SCHEMES[name] = cls
        return cls

    return wrap


class Trainer(Protocol):
    """Central training a scheme may ask the coordinator for (used by ``pooled``)."""

    def __call__(self, state: State, x: np.ndarray, y: np.ndarray, key: tuple[int, ...],
                 parts: Sequence[tuple[int, int]] | None = None) -> tuple[State, float]:
        """Train ``state`` on (x, y) with an RNG seeded from ``key``; return new state and mean loss.

        ``parts``: (scenario index, rows) of the institutions whose rows make up (x, y), in order
        (whose compute the training runs on; Ray Train gives each its own worker); None = everybody's."""
        ...


class Scheme:
    """Base class: every institution, every round, plain local epochs, no merge."""

    name: ClassVar[str] = "base"
    stragglers: str = "drop"  # past engine.round_deadline_s: drop (wait for nobody late) | partial (take work done so far)
    books_idle: ClassVar[bool] = False  # True when book() may change the rows of institutions not in the cohort

    def bind(self, trainer: Trainer) -> None:
        """Receive the coordinator's central trainer; only schemes that train centrally keep it."""

    def plan(self, round: int) -> LocalPlan:
        """The local step institutions run this round."""
        return LocalPlan()

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """Pick this round's cohort out of ``ctx.cohort`` (all institutions), in scenario order."""
        return ctx.cohort

    def receive(self, state: State, updates: Sequence[Update]) -> list[Update]:
        """The updates as :meth:`merge` reads them, from what crossed (compressed uploads back to weights); most pass as is."""
        return list(updates)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """Turn the updates that arrived (in scenario order) into the next global state; None keeps ``state``."""
        return None

    def state(self) -> dict[str, np.ndarray]:
        """What the scheme carries between rounds besides the global state, for checkpoints (most carry nothing)."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue from what :meth:`state` returned."""

    def ledger(self, ctx: RoundContext, updates: Sequence[Update]) -> dict[str, dict[str, float]]:
        """Extra ``bytes_up``, ``bytes_down`` and ``round_trips`` per institution this round beyond the plain exchange
        (e.g. secure aggregation's key agreement); most schemes add nothing."""
        return {}

    def timing(self) -> tuple[float | None, dict[str, float]]:
        """After a merge: (simulated time the round ends, staleness of each institution's update merged) for a scheme
        that does not wait for its slowest member (asynchronous); (None, {}): the round lasts as long as its slowest."""
        return None, {}

    def epsilon(self, round: int) -> float:
        """Client-level privacy spent after ``round`` rounds, the same for every institution; NaN without privacy noise."""
        return float("nan")

    def check(self, institutions: int) -> None:
        """Raise ConfigError if the scheme cannot run with this many institutions (most can run with any)."""

    def check_institutions(self, specs: Sequence[InstitutionSpec]) -> None:
        """Raise ConfigError if the scheme cannot run with these institutions' compute and links (most can)."""

    def attach(self, specs: Sequence[InstitutionSpec], *, row_bytes: int) -> None:
        """Meet the run's institutions before round 1 (specs, and the bytes of one raw training row); schemes that plan
        by compute (compute_share) keep them."""

    def book(self, ctx: RoundContext, rows: list[dict[str, Any]]) -> None:
        """Adjust the round's ledger rows in place for where the work really ran (compute_share); most leave them."""


def sample_cohort(ctx: RoundContext, fraction: float) -> tuple[str, ...]:
    """Deterministic cohort of ``ceil(fraction * n)`` institutions, seeded from (seed, round)."""
    names = ctx.cohort
    if fraction >= 1.0:
        return names
    k = cohort_size(len(names), fraction)
    rng = np.random.default_rng([ctx.seed, ctx.round, 0xC0401])
    picked = np.sort(rng.choice(len(names), size=k, replace=False))
    return tuple(names[i] for i in picked)


def cohort_size(institutions: int, fraction: float) -> int:
    """How many of ``institutions`` :func:`sample_cohort` picks: ``ceil(fraction * n)``, at least one."""
    return institutions if fraction >= 1.0 else max(1, int(np.ceil(fraction * institutions)))


def check_range(key: str, value: float, low: float, high: float = float("inf"), *, low_open: bool = False) -> float:
    """Return ``value`` as a float, or raise ConfigError naming ``scheme.<key>`` when it falls outside [low, high]."""
    v = float(value)
    if not (low < v if low_open else low <= v) or v > high or v != v:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ConfigError(f"scheme.{key}", f"must lie in {bound}, got {value!r}")
    return v
