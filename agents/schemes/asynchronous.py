"""Asynchronous schemes on the simulated clock: updates in flight, arrival order, staleness weights.

Shared by :mod:`agents.schemes.fedasync` (Xie, Koyejo, Gupta 2019) and :mod:`agents.schemes.fedbuff`
(Nguyen et al. 2022). An engine round is one arrival at the server. Each round the scheme dispatches
the institutions that are idle (no update of theirs in flight), at most ``concurrency`` training at
once; they train now, from the current global model (its version t = server steps so far), and each
update joins a queue with its simulated arrival time: the round's start plus the simulated seconds it
took (compute and transfer, from the coordinator's clock). The merge then takes the earliest arrival,
ties in scenario order, weighs it by its staleness s(t - tau) (tau: the version it trained from) and
moves the clock to its arrival: the consortium never waits for its slowest member, and the institution
that arrived is dispatched again at once (next round), from the model as it then stands. FedAsync
steps the model at every arrival; FedBuff adds it to a buffer and steps once K are in.

The queue and the version are the scheme's state, so a checkpoint resumes them exactly; no RNG is
involved unless ``concurrency`` leaves fewer slots than idle institutions (then who is dispatched is
drawn from (seed, round)). The maths of the staleness functions is plain and pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import numpy as np

from agents.schemes.base import Cost, Scheme, check_range
from sim.core.types import ConfigError, InstitutionSpec, RoundContext, State, Update

STALENESS = ("constant", "polynomial", "hinge")
DISPATCH_STREAM = 0xA5C
"""Last element of the RNG key that picks whom to dispatch when ``concurrency`` leaves too few slots."""


def staleness_weight(lag: int, kind: str, a: float, b: float) -> float:
    """Xie et al.'s s(t - tau) for a lag of ``lag`` server steps: constant 1; polynomial (lag + 1)^-a;
    hinge 1 while lag <= b, then 1 / (a (lag - b) + 1). FedBuff's 1/sqrt(1 + lag) is polynomial with a = 0.5."""
    if lag < 0:
        raise ValueError(f"a lag of {lag} server steps: an update cannot come from the future")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((lag + 1.0) ** -a)
    if kind == "hinge":
        return 1.0 if lag <= b else 1.0 / (a * (lag - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}; use one of {', '.join(STALENESS)}")


@dataclass
class InFlight:
    """One update on its way: when it arrives, who sent it, the version it trained from, what the merge reads."""

    arrival: float  # simulated time it reaches the coordinator
    index: int  # the institution's scenario position: breaks ties in arrival time
    institution: str
    version: int  # server steps done when it was dispatched
    payload: dict[str, np.ndarray]  # new weights (FedAsync) or the change to the model it started from (FedBuff)


class Asynchronous(Scheme):
    """Dispatch idle institutions, queue their updates by simulated arrival, take the earliest one each round."""

    asynchronous: ClassVar[bool] = True  # no round waits for its slowest member: engine.round_deadline_s is refused

    def __init__(self, *, concurrency: int, staleness: str, staleness_a: float, staleness_b: float):
        if staleness not in STALENESS:
            raise ConfigError("scheme.staleness", f"unknown staleness function {staleness!r}; use one of "
                              f"{', '.join(STALENESS)}")
        self.staleness = staleness
        self.staleness_a = check_range("staleness_a", staleness_a, 0.0)
        self.staleness_b = check_range("staleness_b", staleness_b, 0.0)
        self.concurrency = int(check_range("concurrency", concurrency, 0.0))
        self.queue: list[InFlight] = []
        self.version = 0
        self.merged: dict[str, int] = {}  # institution -> staleness of its update taken this round
        self.end: float | None = None  # simulated time this round ends (the arrival taken)

    def check(self, specs: Sequence[InstitutionSpec]) -> None:
        """Refuse a concurrency above the institutions (Checks)."""
        self.fits(len(specs))

    def fits(self, institutions: int) -> None:
        """Refuse a concurrency above ``institutions``."""
        if self.concurrency > institutions:
            raise ConfigError("scheme.concurrency", f"at most {institutions} institutions can train at once, got "
                              f"concurrency={self.concurrency}; lower it (0 = all)")

    def slots(self, institutions: int) -> int:
        """How many institutions may train at once."""
        return self.concurrency or institutions

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """The idle institutions, in scenario order; a sample of them fixed by (seed, round) if fewer slots are free."""
        self.fits(len(ctx.cohort))
        busy = {f.institution for f in self.queue}
        idle = [n for n in ctx.cohort if n not in busy]
        free = self.slots(len(ctx.cohort)) - len(self.queue)
        if free >= len(idle):
            return tuple(idle)
        rng = np.random.default_rng([ctx.seed, ctx.round, DISPATCH_STREAM])
        return tuple(idle[i] for i in np.sort(rng.choice(len(idle), size=max(free, 0), replace=False)))

    def payload(self, state: State, update: Update) -> dict[str, np.ndarray]:
        """What the queue keeps of an update trained from ``state`` (subclasses choose)."""
        raise NotImplementedError

    def arrive(self, state: State, update: InFlight, weight: float, lr_scale: float) -> State | None:
        """The server's answer to one arrival of staleness weight ``weight``: the next model, or None to keep
        ``state`` (subclasses choose)."""
        raise NotImplementedError

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """Queue this round's updates by arrival and take the earliest; None if nothing is in flight (every
        dispatch dropped: the clock stays, and they are dispatched again next round) or the arrival was buffered."""
        seconds = dict(ctx.seconds)
        for u in updates:
            if u.state:  # an upload of nothing has nothing to merge
                self.queue.append(InFlight(ctx.sim_time + seconds[u.institution], u.index, u.institution, self.version,
                                           self.payload(state, u)))
        self.queue.sort(key=lambda f: (f.arrival, f.index))
        self.merged, self.end = {}, ctx.sim_time
        if not self.queue:
            return None
        first = self.queue.pop(0)
        lag = self.version - first.version
        self.merged, self.end = {first.institution: lag}, max(ctx.sim_time, first.arrival)
        new = self.arrive(state, first, staleness_weight(lag, self.staleness, self.staleness_a, self.staleness_b),
                          ctx.server_scale)
        self.version += new is not None
        return new

    def cost(self, ctx: RoundContext, updates: Sequence[Update]) -> Cost:
        """The round ends at the arrival taken; its staleness (server steps since the model it trained from)."""
        return Cost(end=self.end, staleness={k: float(v) for k, v in self.merged.items()})

    def state(self) -> dict[str, np.ndarray]:
        """The queue (arrival, index, name, version and payload of every update in flight) and the version."""
        out = {"meta/version": np.array(self.version, np.int64),
               "meta/arrival": np.array([f.arrival for f in self.queue], np.float64),
               "meta/index": np.array([f.index for f in self.queue], np.int64),
               "meta/version_at_dispatch": np.array([f.version for f in self.queue], np.int64),
               "meta/institution": np.array([f.institution for f in self.queue], np.str_)}
        for i, f in enumerate(self.queue):
            out |= {f"q{i}/{k}": v for k, v in f.payload.items()}
        return out

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Continue with a checkpoint's queue and version."""
        if not arrays:
            return
        self.version = int(arrays["meta/version"])
        payloads: list[dict[str, np.ndarray]] = [{} for _ in np.atleast_1d(arrays["meta/arrival"])]
        for name, a in arrays.items():
            group, _, key = name.partition("/")
            if group.startswith("q") and group[1:].isdigit():
                payloads[int(group[1:])][key] = np.asarray(a)
        self.queue = [InFlight(float(t), int(i), str(n), int(v), p) for t, i, n, v, p in zip(
            arrays["meta/arrival"], arrays["meta/index"], arrays["meta/institution"],
            arrays["meta/version_at_dispatch"], payloads)]
