"""The compute broker of ``compute_share``: who is too slow to train at home, and which partner trains for them.

Pure functions over frozen :class:`~sim.core.types.InstitutionSpec`s (no Ray, no data), so the
pre-run check and the coordinator reach the very same plan. The plan is made before
round 1 from what the scenario declares: an institution's local training takes a time
proportional to its data ``share`` divided by its simulated rate (:func:`sim.core.clock.flops_rate`:
cpus/gpus times ``speed``); epochs and the model's multiply-adds per sample are the same
for everybody, so they scale every time alike and cannot change the plan.

1. Reference time: the median (or the fastest) institution's time.
2. Takers: institutions whose time exceeds ``slow_factor`` x the reference.
3. Givers: everybody else. Takers are placed slowest first (list scheduling, longest job
   first, as for makespan); each goes to the giver that would finish it earliest, its own
   training plus the takers it already holds, run one after another at the giver's rate
   (ties: the faster giver, then scenario order). A giver has spare capacity for a taker
   when that finish comes before the taker would finish at home; a taker no giver can
   serve sooner keeps training at home.

Data transfer is left out of the plan: the raw data crosses once (round 1), the training
recurs every round. The ledger books both (agents/schemes/compute_share.py).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from sim.core import clock
from sim.core.types import ConfigError, InstitutionSpec

REFERENCES = ("median", "fastest")


@dataclass(frozen=True)
class Plan:
    """The broker's decision: own time per institution (relative units), who is slow, and who trains for whom."""

    own: Mapping[str, float]  # share / flops rate: each institution's training time at home, in relative units
    reference: float  # the time a taker is measured against (median or fastest of ``own``)
    takers: tuple[str, ...]  # slower than slow_factor x reference, slowest first (served or not)
    partner: Mapping[str, str]  # taker -> giver that trains its data (takers nobody can serve are absent)
    finish: Mapping[str, float]  # giver -> its own plus its takers' training time, in relative units

    @property
    def makespan_alone(self) -> float:
        """The round's compute time without sharing: the slowest institution's own time (relative units)."""
        return max(self.own.values(), default=0.0)

    @property
    def makespan_shared(self) -> float:
        """The round's compute time with the plan: givers' totals and the unserved takers' own times."""
        at_home = [t for n, t in self.own.items() if n not in self.partner and n not in self.finish]
        return max([*self.finish.values(), *at_home], default=0.0)


def own_time(spec: InstitutionSpec) -> float:
    """Relative training time at home: data share over simulated rate (cores' worth of multiply-adds per second)."""
    return spec.share / (clock.flops_rate(spec) / clock.FLOPS_PER_CPU)


def plan(specs: Sequence[InstitutionSpec], slow_factor: float, reference: str = "median") -> Plan:
    """Decide who is a taker and which giver trains each taker's data (see the module docstring)."""
    if reference not in REFERENCES:
        raise ConfigError("scheme.reference", f"unknown reference {reference!r}; use one of {', '.join(REFERENCES)}")
    order = {s.name: i for i, s in enumerate(specs)}
    rate = {s.name: clock.flops_rate(s) for s in specs}
    own = {s.name: own_time(s) for s in specs}
    if not own:
        return Plan(own={}, reference=0.0, takers=(), partner={}, finish={})
    ref = statistics.median(own.values()) if reference == "median" else min(own.values())
    takers = tuple(sorted((n for n, t in own.items() if t > slow_factor * ref), key=lambda n: (-own[n], order[n])))
    share = {s.name: s.share for s in specs}
    finish = {n: own[n] for n in own if n not in takers}  # every giver, busy with its own data first
    partner: dict[str, str] = {}
    for k in takers:
        done = {g: finish[g] + share[k] / (rate[g] / clock.FLOPS_PER_CPU) for g in finish}  # if g took k on now
        best = min(done, key=lambda g: (done[g], -rate[g], order[g]), default=None)
        if best is not None and done[best] < own[k]:
            finish[best], partner[k] = done[best], best
    used = {g: finish[g] for g in finish if g in partner.values()}
    return Plan(own=own, reference=ref, takers=takers, partner=partner, finish=used)


def check(specs: Sequence[InstitutionSpec], slow_factor: float, reference: str = "median") -> Plan:
    """The plan, or a ConfigError naming the key when nobody is slow enough or nobody has spare capacity."""
    if len(specs) < 2:
        raise ConfigError("scenario.institutions", f"compute sharing needs at least two institutions, got "
                          f"{len(specs)}; add institutions or use scheme=fedavg")
    p = plan(specs, slow_factor, reference)
    slowest = max(p.own, key=lambda n: p.own[n])
    if not p.takers:
        ratio = p.own[slowest] / p.reference if p.reference > 0 else 1.0
        raise ConfigError("scheme.slow_factor", f"no institution is slow enough to hand its training over: the "
                          f"slowest, {slowest}, takes {ratio:.2f}x the {reference} institution's time, not more "
                          f"than slow_factor={slow_factor:g}; lower scheme.slow_factor (>= 1) or use scheme=fedavg")
    if not p.partner:
        raise ConfigError("scenario.institutions", f"compute sharing with no institution that has spare capacity: "
                          f"no partner would finish the training of {', '.join(p.takers)} sooner than they do at "
                          "home; give a partner more cpus/gpus/speed (scenario.institutions[i].cpus) or use "
                          "scheme=fedavg")
    return p
