"""The fault model: which selected institutions do not deliver an update this round, and why.

Real consortia are messy: a site is offline for a round (``availability``), or its local
training breaks halfway (``failure_rate``). Both are drawn per institution and round from
an RNG seeded by (seed, institution, round), so a run with faults is as reproducible as
one without, whatever the placement, and one institution's luck never depends on who
else was selected. Process faults (a host actor that dies, raises or misses the round's
deadline) are not drawn here: the backend observes them and the ledger records them.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from sim.core.types import InstitutionSpec

OK = "ok"  # in the cohort and its update arrived
IDLE = "idle"  # not selected by the scheme this round
UNAVAILABLE = "unavailable"  # selected but offline this round (fault model)
FAILED = "failed"  # took the global state, its local step failed (fault model)
CRASHED = "crashed"  # its host actor died or raised (a real process fault)
TIMEOUT = "timeout"  # its host missed the round deadline engine.round_timeout_s (a real process fault)
LATE = "late"  # a straggler its scheme does not wait for past engine.round_deadline_s (sim/core/stragglers.py)
STATUSES = (OK, IDLE, UNAVAILABLE, FAILED, CRASHED, TIMEOUT, LATE)
"""Values of the ledger's ``status`` column."""

FAULT_STREAM = 0xFA17
"""Last element of the fault RNG key, so fault draws never share a stream with training or sampling."""


def draw(spec: InstitutionSpec, seed: int, round: int) -> str:
    """OK, UNAVAILABLE or FAILED for one selected institution in one round."""
    if spec.availability >= 1.0 and spec.failure_rate <= 0.0:
        return OK  # the common case costs no RNG
    offline, broken = np.random.default_rng([seed, spec.index, round, FAULT_STREAM]).random(2)
    if offline >= spec.availability:
        return UNAVAILABLE
    return FAILED if broken < spec.failure_rate else OK


def dropped(specs: Mapping[str, InstitutionSpec], cohort: Iterable[str], seed: int, round: int
            ) -> tuple[tuple[str, str], ...]:
    """(name, fault) of every cohort member the fault model keeps from delivering, in scenario order. ``specs``:
    every institution by name; only the cohort's are looked at (a round's cost follows the cohort, not the
    population)."""
    members = sorted((specs[name] for name in set(cohort)), key=lambda s: s.index)
    return tuple((s.name, fault) for s in members if (fault := draw(s, seed, round)) != OK)
