"""Stragglers: per-round slowdowns, the round deadline, and who is late or sends partial work.

Institutions differ in compute (``cpus``/``gpus`` times ``speed``, :mod:`sim.core.clock`) and in
link; on top of that a round may slow some of them down, either drawn from the scenario
(``scenario.straggler_share`` of them, each ``scenario.slowdown`` times slower, from an RNG
seeded by (seed, institution, round, SLOW_STREAM)) or read from a FedScale-style trace
(``scenario.speed_trace``: a CSV of institution, round, speed and/or available).

With ``engine.round_deadline_s`` a synchronous round waits no longer than the deadline. An
institution whose planned local work at this round's speed plus its transfers would take
longer is a straggler, and its scheme says what it does (``scheme.stragglers``):

- ``drop`` (FedAvg, McMahan et al. 2017): its update is not waited for; the ledger says
  ``late`` and books the global model it had downloaded;
- ``partial`` (FedProx's gamma-inexact solutions, Li et al. 2020): it sends what it trained
  by the deadline, floor(fraction x planned minibatch steps), at least one step; the
  ledger says ``ok`` with ``work_done`` < 1.

Everything here is decided in the coordinator's ``begin_round`` from the config and the
seed alone, so hosts on any placement see the same cohort, slowdowns and step caps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sim.core import clock, faults
from sim.core.types import ConfigError, InstitutionSpec, RoundContext, TrainingSpec, listing, shown

POLICIES = ("drop", "partial")
"""What a scheme does with a straggler (``scheme.stragglers``)."""
SLOW_STREAM = 0x510E
"""Last element of the slowdown RNG key, apart from faults, training and sampling."""


@dataclass(frozen=True)
class StragglerSpec:
    """Per-round slowdowns and the round deadline, validated (plain data: it ships to the coordinator actor)."""

    deadline_s: float | None = None  # engine.round_deadline_s; None = rounds wait for the slowest
    share: float = 0.0  # probability an institution is slowed in a round (scenario.straggler_share)
    slowdown: tuple[float, float] = (1.0, 1.0)  # a slowed institution's compute takes U[low, high] times longer
    trace: Mapping[tuple[str, int], tuple[float, bool]] = field(default_factory=dict)  # (name, round) -> (speed, available)
    trace_rounds: int = 0  # the trace's last round; later rounds read it again from its first (the trace loops)

    @property
    def active(self) -> bool:
        """Whether anything here can change a round."""
        return self.deadline_s is not None or self.share > 0 or bool(self.trace)

    def factor(self, spec: InstitutionSpec, seed: int, round: int) -> tuple[float, bool]:
        """(speed factor this round, available) of one institution: 1 and True unless slowed or offline."""
        if self.trace:
            at = (round - 1) % self.trace_rounds + 1
            return self.trace.get((spec.name, at), (1.0, True))
        if self.share <= 0:
            return 1.0, True
        slowed, u = np.random.default_rng([seed, spec.index, round, SLOW_STREAM]).random(2)
        if slowed >= self.share:
            return 1.0, True
        low, high = self.slowdown
        return 1.0 / (low + u * (high - low)), True


def load(scenario_cfg: Mapping[str, Any], deadline: float | None, names: Sequence[str]) -> StragglerSpec:
    """The validated straggler settings of a run (raises ConfigError naming the key), before any actor starts."""
    share = float(scenario_cfg.get("straggler_share") or 0.0)
    slowdown = _slowdown(scenario_cfg.get("slowdown"))
    path = scenario_cfg.get("speed_trace")
    if path is None:
        return StragglerSpec(deadline_s=deadline, share=share, slowdown=slowdown)
    if share > 0:
        raise ConfigError("scenario.speed_trace", "a trace and drawn slowdowns (scenario.straggler_share > 0) both set "
                          "this round's speeds; keep one: straggler_share=0 or speed_trace=null")
    trace, rounds = read_trace(str(path), names)
    return StragglerSpec(deadline_s=deadline, trace=trace, trace_rounds=rounds)


def _slowdown(value: Any) -> tuple[float, float]:
    """``scenario.slowdown``: [low, high] with 1 <= low <= high (how many times longer a slowed institution computes)."""
    if value is None:
        return (1.0, 1.0)
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or not 1.0 <= value[0] <= value[1]:
        raise ConfigError("scenario.slowdown", f"expected [low, high] with 1 <= low <= high (times longer a slowed "
                          f"institution computes), got {value!r}")
    return float(value[0]), float(value[1])


def read_trace(path: str, names: Sequence[str]) -> tuple[dict[tuple[str, int], tuple[float, bool]], int]:
    """A speed/availability trace CSV (institution, round, speed and/or available): (lookup, last round).

    ``speed`` multiplies the institution's own speed in that round (0.1: ten times slower);
    ``available`` (0/1) takes it out of a round it was selected for. Every institution of the
    scenario must appear; a missing (institution, round) pair means full speed and available.
    """
    import pandas as pd  # only with a trace: host and coordinator processes need no pandas otherwise (0.4 s each)

    key = "scenario.speed_trace"
    try:
        table = pd.read_csv(Path(path).expanduser())
    except Exception as e:  # noqa: BLE001 - a missing or damaged file is bad input like any other
        raise ConfigError(key, f"cannot read {path} ({type(e).__name__}); give a CSV with columns institution, round, "
                          "speed and/or available") from None
    cols = set(table.columns)
    if not {"institution", "round"} <= cols or not cols & {"speed", "available"}:
        raise ConfigError(key, f"{path} has columns {sorted(cols)}; it needs institution, round and speed and/or available")
    if table.empty:
        raise ConfigError(key, f"{path} has no rows")
    rounds = pd.to_numeric(table["round"], errors="coerce")
    bad = table.index[~(rounds.notna() & (rounds >= 1) & (rounds == rounds.round()))]
    if len(bad):
        raise ConfigError(key, f"{path}: {_rows(table, bad, 'round')}; it must be a whole number >= 1")
    speed = pd.to_numeric(table["speed"], errors="coerce") if "speed" in cols else pd.Series(1.0, index=table.index)
    bad = table.index[~(speed.notna() & np.isfinite(speed) & (speed > 0))]
    if len(bad):
        raise ConfigError(key, f"{path}: {_rows(table, bad, 'speed')}; it must be a number > 0 (1 = its own speed)")
    avail = pd.to_numeric(table["available"], errors="coerce") if "available" in cols else pd.Series(1, index=table.index)
    bad = table.index[~avail.isin([0, 1])]
    if len(bad):
        raise ConfigError(key, f"{path}: {_rows(table, bad, 'available')}; it must be 0 or 1")
    listed = set(table["institution"].astype(str))
    missing = [n for n in names if n not in listed]
    if missing:
        raise ConfigError(key, f"{path} has no rows for {len(missing)} institution(s): {listing(map(repr, missing))}; "
                          "give every institution of the scenario its rows")
    unknown = sorted(listed - set(names))
    if unknown:
        raise ConfigError(key, f"{path} names {len(unknown)} institution(s) the scenario does not have: "
                          f"{listing(map(repr, unknown))}")
    out = {}
    for name, r, s, a in zip(table["institution"].astype(str), rounds.astype(int), speed.astype(float), avail):
        if (name, r) in out:
            raise ConfigError(key, f"{path} has two rows for institution {name!r} in round {r}")
        out[(name, r)] = (s, bool(a))
    return out, int(rounds.max())


def _rows(table: Any, bad: Any, column: str) -> str:
    """Where a trace's ``column`` is wrong: how many rows, and each (or the first few) with its value and institution."""
    rows = [f"row {i + 2} ({shown(table[column][i])} of {shown(table['institution'][i])})" for i in bad]
    return f"{column} is wrong in {len(rows)} row(s): {listing(rows)}"


def check_policy(policy: str) -> str:
    """``scheme.stragglers`` as given, or a ConfigError naming the choices."""
    if policy not in POLICIES:
        raise ConfigError("scheme.stragglers", f"unknown policy {policy!r}; use drop (late updates are not waited for) "
                          "or partial (stragglers send the work done by engine.round_deadline_s)")
    return policy


def planned_steps(n: int, training: TrainingSpec) -> int:
    """Minibatch steps of a full local step on ``n`` samples (what ``sim.core.train._minibatches`` draws)."""
    return training.local_epochs * math.ceil(n / max(1, int(training.batch_size))) if n else 0


def processed(steps: int, n: int, training: TrainingSpec) -> int:
    """Forward+backward passes in the first ``steps`` minibatches of a local step on ``n`` samples."""
    per_epoch = math.ceil(n / max(1, int(training.batch_size))) if n else 0
    if per_epoch == 0:
        return 0
    epochs, rest = divmod(steps, per_epoch)
    return epochs * n + rest * max(1, int(training.batch_size))  # rest < per_epoch: only full batches


def seen(steps: int, n: int, training: TrainingSpec) -> int:
    """Distinct training samples behind the first ``steps`` minibatches (each epoch is one permutation)."""
    return min(n, processed(steps, n, training))


def cap(ctx: RoundContext, name: str) -> int | None:
    """The minibatch steps ``name`` stops after this round (a partial straggler), or None for its full local step."""
    return next((steps for who, steps, _ in ctx.partial if who == name), None)


def work_done(ctx: RoundContext, name: str) -> float:
    """Fraction of its planned local work whose result ``name`` sent this round (1 unless it is a partial straggler)."""
    return next((frac for who, _, frac in ctx.partial if who == name), 1.0)


def slowed(spec: InstitutionSpec, ctx: RoundContext) -> InstitutionSpec:
    """``spec`` at this round's speed (the simulated clock reads it)."""
    f = next((f for who, f in ctx.slowdown if who == spec.name), 1.0)
    return spec if f == 1.0 else replace(spec, speed=spec.speed * f)


class Deadline:
    """Applies a run's slowdowns and deadline to a round's context (lives in the coordinator)."""

    def __init__(self, spec: StragglerSpec, sizes: Mapping[str, int], training: TrainingSpec, flops: int):
        self.spec, self.sizes, self.training, self.flops = spec, dict(sizes), training, flops

    def apply(self, ctx: RoundContext, specs: Mapping[str, InstitutionSpec], model_bytes: int, policy: str) -> RoundContext:
        """``ctx`` with slowdowns, offline members (trace) and stragglers: ``late`` ones out, ``partial`` ones capped."""
        if not self.spec.active:
            return ctx
        slow, offline, late, partial = [], [], [], []
        deadline = self.spec.deadline_s
        one_step = not getattr(ctx.plan.client, "local_sgd", True)  # FedSGD: one full-shard gradient, no steps
        for name in ctx.cohort:
            f, available = self.spec.factor(specs[name], ctx.seed, ctx.round)
            if f != 1.0:
                slow.append((name, f))
            if not available:
                offline.append((name, faults.UNAVAILABLE))
                continue
            if deadline is None or ctx.plan.upload == "data":
                continue
            at = replace(specs[name], speed=specs[name].speed * f)
            n = self.sizes.get(name, 0)
            samples = n if one_step else self.training.local_epochs * n
            down = model_bytes if ctx.plan.start == "global" else 0
            up = 0 if ctx.plan.upload == "nothing" else model_bytes
            transfer = clock.transfer_seconds(at, up, down)
            compute = clock.compute_seconds(at, samples, self.flops)
            if transfer + compute <= deadline:
                continue
            steps = planned_steps(n, self.training)
            if policy == "partial" and steps > 0 and not one_step:
                done = max(1, min(steps, math.floor(max(0.0, deadline - transfer) / compute * steps)))
                if done < steps:
                    partial.append((name, done, done / steps))
                    continue
            late.append((name, faults.LATE))
        gone = {n for n, _ in offline + late}
        dropped = dict(ctx.dropped) | dict(offline) | dict(late)
        return replace(ctx, cohort=tuple(n for n in ctx.cohort if n not in gone), slowdown=tuple(slow),
                       partial=tuple(partial), dropped=tuple((n, dropped[n]) for n in specs if n in dropped))


def round_seconds(rows: Sequence[Mapping[str, Any]], deadline: float | None) -> float:
    """How long a synchronous round lasts: its slowest participant, but no longer than the deadline, which it
    reaches whenever someone was late."""
    longest = max((row["simulated_seconds"] for row in rows), default=0.0)
    if deadline is None:
        return longest
    if any(row["status"] == faults.LATE for row in rows):
        return deadline
    return min(deadline, longest)


def round_end(rows: Sequence[Mapping[str, Any]], start: float, deadline: float | None) -> float:
    """The simulated time a round that began at ``start`` ends: when the update an asynchronous scheme merged arrived
    (``round_end``, on the coordinator's row), else ``start`` plus :func:`round_seconds`. The engine's clock; the
    coordinator begins the next round with it (agents.runtime.backend), so both must read the rows alike."""
    end = next((row["round_end"] for row in rows if "round_end" in row), None)
    return end if end is not None else start + round_seconds(rows, deadline)
