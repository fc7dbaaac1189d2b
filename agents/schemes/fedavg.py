"""Federated averaging (FedAvg).

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017. Institutions run local SGD epochs
from the global model; the server replaces it with the sample-weighted mean of the
returned weights. ``server_lr`` generalises that step (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021): new = old + server_lr * (mean - old).
"""

from __future__ import annotations

from typing import Sequence

from agents.schemes.aggregate import server_step, weighted_average
from agents.schemes.base import Scheme, check_range, register, sample_cohort
from sim.types import ConfigError, LocalPlan, RoundContext, State, Update

WEIGHTINGS = ("samples", "uniform")


@register("fedavg")
class FedAvg(Scheme):
    """Average the cohort's weights (by samples or uniformly) and step the global model towards the mean."""

    def __init__(self, *, weighting: str = "samples", server_lr: float = 1.0, cohort_fraction: float = 1.0):
        if weighting not in WEIGHTINGS:
            raise ConfigError("scheme.weighting", f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        self.weighting = weighting
        self.server_lr = check_range("server_lr", server_lr, 0.0, low_open=True)
        self.cohort_fraction = check_range("cohort_fraction", cohort_fraction, 0.0, 1.0, low_open=True)

    def plan(self, round: int) -> LocalPlan:
        """Plain local SGD from the global model; upload the weights."""
        return LocalPlan()

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """A ``cohort_fraction`` sample of institutions, fixed by (seed, round)."""
        return sample_cohort(ctx, self.cohort_fraction)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """Weighted mean of the updates' (possibly partial) states, applied with ``server_lr`` (times the round's
        ``training.server_schedule`` factor); None if nothing usable arrived."""
        usable = [u for u in updates if u.state and (self.weighting == "uniform" or u.num_samples > 0)]
        if not usable:
            return None
        weights = [1.0 if self.weighting == "uniform" else float(u.num_samples) for u in usable]
        return server_step(state, weighted_average([u.state for u in usable], weights), self.server_lr * ctx.server_scale)
