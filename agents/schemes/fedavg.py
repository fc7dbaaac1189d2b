"""Federated averaging (FedAvg).

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017. Institutions run local SGD epochs
from the global model; the server replaces it with the sample-weighted mean of the
returned weights. The server's step is a parameter (FedJAX's ``server_optimizer``):
``sgd`` moves new = old + server_lr * (mean - old) (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021: server_lr 1 is the paper's replacement); ``momentum``, ``adam``
and ``yogi`` treat mean - old as a pseudo-gradient (:mod:`agents.schemes.server_optimisers`;
fedavgm, fedadam and fedyogi are FedAvg with those optimisers and their own settings).

``merge`` is ``step(aggregate(updates))``: robust merge rules, secure aggregation and client-level
differential privacy replace ``aggregate`` and keep the step, and compression restores uploads
before it; they are wrappers (:mod:`agents.wrappers`; ``aggregator=``, ``secagg=``, ``privacy=``,
``compression=``) that compose over FedAvg and every variant whose merge is its own (``averages``).
``stragglers`` says what an institution that misses ``engine.round_deadline_s`` does
(:mod:`sim.core.stragglers`): ``drop`` (the default, as in the paper: the round goes on without it)
or ``partial`` (it sends the local steps it finished).
"""

from __future__ import annotations

from typing import ClassVar, Sequence

from agents.schemes.aggregate import weighted_average
from agents.schemes.base import Scheme, check_range, register, sample_cohort
from agents.schemes.server_optimisers import OPTIMISERS, SGD
from sim.core.stragglers import check_policy
from sim.core.types import ConfigError, LocalPlan, RoundContext, State, Update

WEIGHTINGS = ("samples", "uniform")


@register("fedavg")
class FedAvg(Scheme):
    """Average the cohort's weights (by samples or uniformly) and step the global model towards the mean."""

    averages: ClassVar[bool] = True  # merge is step(aggregate): wrappers may replace the aggregate (agents/wrappers)
    weighting: str = "samples"  # the default of the weighting argument; SCAFFOLD and q-FFL take uniform

    def __init__(self, *, weighting: str | None = None, server_lr: float = 1.0, cohort_fraction: float = 1.0,
                 server_optimizer: str | SGD = "sgd", stragglers: str | None = None):
        weighting = type(self).weighting if weighting is None else weighting
        if weighting not in WEIGHTINGS:
            raise ConfigError("scheme.weighting", f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if isinstance(server_optimizer, str) and server_optimizer not in OPTIMISERS:
            raise ConfigError("scheme.server_optimizer", f"unknown server optimizer {server_optimizer!r}; use one of "
                              f"{', '.join(OPTIMISERS)}")
        self.weighting = weighting
        self.optimizer = OPTIMISERS[server_optimizer]() if isinstance(server_optimizer, str) else server_optimizer
        # McMahan et al.: the server does not wait for late devices; FedProx keeps their partial work
        self.stragglers = check_policy(type(self).stragglers if stragglers is None else stragglers)
        self.server_lr = check_range("server_lr", server_lr, 0.0, low_open=True)
        self.cohort_fraction = check_range("cohort_fraction", cohort_fraction, 0.0, 1.0, low_open=True)

    def plan(self, round: int) -> LocalPlan:
        """Plain local SGD from the global model; upload the weights."""
        return LocalPlan()

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """A ``cohort_fraction`` sample of institutions, fixed by (seed, round)."""
        return sample_cohort(ctx, self.cohort_fraction)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """The cohort's mean of the updates' (possibly partial) states, applied by the server optimiser with
        ``server_lr`` (times the round's ``training.server_schedule`` factor); None if nothing usable arrived."""
        return self.step_to(ctx, state, self.aggregate(state, updates))

    def step_to(self, ctx: RoundContext, state: State, target: State | None) -> State | None:
        """The server step from ``state`` towards a merged ``target`` at this round's rate (``server_lr`` times the
        ``training.server_schedule`` factor); None when nothing was merged. Wrappers that replace the mean call it."""
        return None if target is None else self.step(state, target, self.server_lr * ctx.server_scale)

    def usable(self, updates: Sequence[Update]) -> list[Update]:
        """The updates a merge can use: those that sent a state and, weighted by samples, trained on some."""
        return [u for u in updates if u.state and (self.weighting == "uniform" or u.num_samples > 0)]

    def weights(self, updates: Sequence[Update]) -> list[float]:
        """Each update's weight in the mean: its sample count, or 1 under ``weighting=uniform``."""
        return [1.0 if self.weighting == "uniform" else float(u.num_samples) for u in updates]

    def aggregate(self, state: State, updates: Sequence[Update]) -> dict | None:
        """The cohort's weighted mean; None if nothing usable arrived."""
        usable = self.usable(updates)
        return weighted_average([u.state for u in usable], self.weights(usable)) if usable else None

    def step(self, state: State, target: State, lr: float) -> State:
        """The server optimiser's step from ``state`` towards the merged ``target``."""
        return self.optimizer.step(state, target, lr)

    def state(self) -> dict:
        """The server optimiser's moments (plain SGD: none), for checkpoints."""
        return self.optimizer.state()

    def load_state(self, arrays: dict) -> None:
        """Continue with a checkpoint's moments."""
        self.optimizer.load_state(arrays)
