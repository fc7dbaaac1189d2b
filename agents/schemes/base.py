"""The scheme protocol, the client half every scheme starts from, and the registry.

A scheme decides *who* trains each round (``select``), *what* local training looks
like (``plan``: a :class:`~sim.core.types.LocalPlan` carrying the scheme's :class:`Client`
half) and *how* updates become the next global state (``merge``). The maths of merging
lives in :mod:`agents.schemes.aggregate`; a scheme only decides.

A scheme owns both halves: its client half is a small frozen :class:`Client` subclass in
its own file (FedProx's pull, SCAFFOLD's correction and control variate, Ditto's personal
model, FedPer's own head, fine-tuning before scoring, q-FFL's start loss, FedSGD's gradient),
whose hooks the institution calls at fixed points of its round (:mod:`agents.institution`).
The trainer below them (:mod:`sim.core.train`, :mod:`sim.core.batched`) knows only generic
objective terms (:mod:`sim.core.objective`), so it stays scheme-agnostic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from sim.core.models import get_state
from sim.core.objective import Pull, Term
from sim.core.types import (ConfigError, InstitutionSpec, LocalPlan, RoundContext, State, TrainingSpec, Update,
                            state_nbytes)

if TYPE_CHECKING:
    import torch

    from agents.institution import Institution

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


@dataclass
class Work:
    """What an institution's local step produced, passed through its scheme's client hooks in turn."""

    payload: dict[str, np.ndarray]  # what it would send (before behaviours and the wrappers' client halves)
    loss: float = math.nan  # mean training loss of the step (data loss only)
    steps: int = 0  # optimizer steps taken
    processed: int = 0  # samples processed (forward + backward: what the simulated clock charges)
    samples: int = 0  # training samples behind the update (what a weighted mean weighs it by)
    start_loss: float = math.nan  # q-FFL: the received model's loss on the own training data


@dataclass(frozen=True)
class Client:
    """FedAvg's client half, which every scheme's starts from: plain local SGD from the start state, weights sent,
    the global model scored. A scheme that changes the local step subclasses it in its own file; it travels to the
    hosts in the round's LocalPlan, so it stays small and frozen (numpy arrays at most)."""

    batchable: ClassVar[bool] = True  # its local step is plain SGD plus at most a pull: the vectorised step may run it
    adapts: ClassVar[bool] = False  # scoring first adapts a copy of the model (fine-tuning): no batched scoring
    whole: ClassVar[bool] = True  # every key of the model is sent and merged (FedPer keeps its head home)
    local_sgd: ClassVar[bool] = True  # the step is local SGD (FedSGD sends one full-shard gradient instead)

    def received(self, inst: Institution, global_state: State | None) -> State | None:
        """What of the global state this institution receives (and so starts from, and is booked for); FedAvg: all of
        it. FedDF, whose global state holds one model per architecture, gives each institution its own architecture's."""
        return global_state

    def pull(self) -> float:
        """Weight of a proximal pull towards the start state (FedProx's mu); 0: none."""
        return 0.0

    def start(self, inst: Institution, plan: LocalPlan, global_state: State | None) -> State | None:
        """The state the local step starts from: the institution's own model or the global one, as the plan says."""
        return inst.personal if plan.start == "personal" else global_state

    def kept(self, global_state: State) -> tuple[str, ...]:
        """Keys of the model the institution keeps at home (never sent, never received); FedAvg: none."""
        return ()

    def terms(self, inst: Institution, model: torch.nn.Module, start: State) -> tuple[Term, ...]:
        """Extra terms of the local objective (:mod:`sim.core.objective`): the pull towards the start, if any."""
        mu = self.pull()
        return (Pull(mu, start),) if mu > 0 else ()

    def local_step(self, inst: Institution, model: torch.nn.Module, start: State, training: TrainingSpec, key: tuple[int, ...],
                   cap: int | None) -> Work:
        """The round's local work on ``model`` (set to ``start``): local SGD under :meth:`terms`."""
        return inst.sgd(model, training, key, cap, self.terms(inst, model, start))

    def after(self, inst: Institution, model: torch.nn.Module, plan: LocalPlan, global_state: State | None,
              work: Work, round: int, training: TrainingSpec) -> None:
        """What the institution keeps after its step (a personal start: the trained model), before anything is sent."""
        if plan.start == "personal":
            inst.personal, inst.changed = get_state(model), True

    def finish(self, inst: Institution, start: State, payload: dict[str, np.ndarray], work: Work,
               training: TrainingSpec) -> dict[str, np.ndarray]:
        """The upload as it leaves the step (after any behaviour bent it); FedAvg: as it is."""
        return payload

    def bytes_down(self, plan: LocalPlan, global_state: State | None, kept: Sequence[str] = ()) -> int:
        """Bytes an institution receives for the round: the global model less the keys it keeps, when it starts
        from it; nothing when it starts from its own."""
        if plan.start != "global" or not global_state:
            return 0
        return state_nbytes(global_state) - state_nbytes({k: global_state[k] for k in kept})

    def scored(self, inst: Institution, plan: LocalPlan, global_state: State | None) -> State | None:
        """The model the institution ends the round with, which it is scored on."""
        return inst.personal if plan.evaluate == "personal" else global_state

    def adapt(self, inst: Institution, model: torch.nn.Module) -> None:
        """Change the lent model before it is scored (fine-tuning); FedAvg: nothing."""


PLAIN = Client()
"""The client half of a plan that names none: FedAvg's."""


class Scheme:
    """The protocol every scheme implements: five methods. This base is the scheme that does nothing (every
    institution, every round, plain local epochs, no merge); a scheme that needs more says so by implementing one of
    the optional capabilities below (:class:`Checks`, :class:`Costs`, :class:`Books`, :class:`Central`)."""

    name: ClassVar[str] = "base"
    stragglers: str = "drop"  # past engine.round_deadline_s: drop (wait for nobody late) | partial (take work done so far)
    books_idle: ClassVar[bool] = False  # True when Books.book may change the rows of institutions not in the cohort
    mixed_models: ClassVar[bool] = False  # True when institutions may train different architectures (no weight averaging)

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """Pick this round's cohort out of ``ctx.cohort`` (all institutions), in scenario order."""
        return ctx.cohort

    def plan(self, round: int) -> LocalPlan:
        """What the round asks of institutions: where the step starts, what is sent, what is scored, its client half."""
        return LocalPlan()

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """Turn the updates that arrived (in scenario order, as they crossed) into the next global state; None keeps
        ``state``."""
        return None

    def state(self) -> dict[str, np.ndarray]:
        """What the scheme carries between rounds besides the global state, for checkpoints (most carry nothing)."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue from what :meth:`state` returned."""


@dataclass(frozen=True)
class Cost:
    """What a round cost beyond the plain exchange of models, as a scheme reports it after its merge."""

    extras: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # institution -> extra bytes_up, bytes_down,
    # round_trips (secure aggregation's key agreement, SCAFFOLD's control to members that then failed)
    end: float | None = None  # simulated time the round ends (asynchronous schemes); None: when its slowest finishes
    staleness: Mapping[str, float] = field(default_factory=dict)  # institution -> staleness of its update merged
    epsilon: float = math.nan  # client-level privacy spent so far, the same for every institution; NaN: no noise


@runtime_checkable
class Checks(Protocol):
    """A scheme that cannot run with every set of institutions (Krum's cohort bound, compute sharing's takers, ...)."""

    def check(self, specs: Sequence[InstitutionSpec]) -> None:
        """Raise ConfigError, naming the key and the fix, if the scheme cannot run with these institutions."""


@runtime_checkable
class Costs(Protocol):
    """A scheme whose round costs more than the plain exchange, ends on its own clock, or spends privacy."""

    def cost(self, ctx: RoundContext, updates: Sequence[Update]) -> Cost:
        """What this round cost, asked right after :meth:`Scheme.merge` with the updates that crossed."""


@runtime_checkable
class Books(Protocol):
    """A scheme that moves work between institutions (compute sharing): it rewrites their ledger rows."""

    def attach(self, specs: Sequence[InstitutionSpec], *, row_bytes: int) -> None:
        """Meet the run's institutions before round 1 (and the bytes of one raw training row)."""

    def book(self, ctx: RoundContext, rows: list[dict[str, Any]]) -> None:
        """Adjust the round's ledger rows in place for where the work really ran."""


@runtime_checkable
class Central(Protocol):
    """A scheme that trains at the coordinator (pooled data)."""

    def bind(self, trainer: Trainer) -> None:
        """Receive the coordinator's central trainer."""


@runtime_checkable
class Distils(Protocol):
    """A scheme that works through an unlabeled public set (knowledge distillation: feddf, fedmd)."""

    def attach_public(self, x_public: np.ndarray, build: Callable[[str], torch.nn.Module],
                      archs: Mapping[str, str], state: State) -> State | None:
        """Meet the public set's inputs, a builder of each architecture's model (seeded like the institutions'),
        each institution's architecture (name -> arch) and the coordinator's starting state, before round 1; return
        the global state to start from instead (None keeps it)."""


def checked(scheme: Any, specs: Sequence[InstitutionSpec]) -> None:
    """Refuse institutions the scheme cannot run with (nothing to check for most)."""
    if isinstance(scheme, Checks):
        scheme.check(specs)


def personal(scheme: Any) -> bool:
    """Whether each institution is scored on a model of its own (its own model, its own head, or the merged model
    adapted to its data first), not on the one shared model: what tasks whose label spaces differ per institution
    need. Asks the plan, so a wrapper (which passes the plan on) answers as the scheme it wraps."""
    if isinstance(scheme, Distils):  # distillation needs one label space: the public set's scores are compared
        return False
    plan = scheme.plan(1)
    return plan.evaluate == "personal" or bool((plan.client or PLAIN).adapts)


def personal_schemes() -> list[str]:
    """Registered schemes that are :func:`personal` with their default settings (for messages)."""
    names = []
    for name, cls in SCHEMES.items():
        try:
            if personal(cls()):
                names.append(name)
        except ConfigError:  # needs settings of its own (dp_fedavg's noise): a FedAvg, not personal
            continue
    return names


def cost_of(scheme: Any, ctx: RoundContext, updates: Sequence[Update]) -> Cost:
    """What the round cost beyond the plain exchange (nothing for most schemes)."""
    return scheme.cost(ctx, updates) if isinstance(scheme, Costs) else Cost()


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
