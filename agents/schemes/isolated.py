"""Isolated training: every institution trains on its own shard and never shares.

The no-collaboration baseline that every collaboration gain is measured against
(the "local training" baseline of e.g. Li et al., "Federated Learning on Non-IID Data
Silos: An Experimental Study", ICDE 2022). Nothing crosses the network.
"""

from __future__ import annotations

from typing import Sequence

from agents.schemes.base import Scheme, check_range, register, sample_cohort
from sim.core.types import LocalPlan, RoundContext, State, Update


@register("isolated")
class Isolated(Scheme):
    """Each institution keeps and scores its own personal model; the global state never changes."""

    mixed_models = True  # nothing is averaged: each institution may train an architecture of its own

    def __init__(self, *, cohort_fraction: float = 1.0):
        self.cohort_fraction = check_range("cohort_fraction", cohort_fraction, 0.0, 1.0, low_open=True)

    def plan(self, round: int) -> LocalPlan:
        """Train the personal model, upload nothing, score the personal model."""
        return LocalPlan(start="personal", upload="nothing", evaluate="personal")

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """A ``cohort_fraction`` sample of institutions trains this round."""
        return sample_cohort(ctx, self.cohort_fraction)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """Nothing to merge: keep the (untrained) global state."""
        return None
