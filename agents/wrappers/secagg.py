"""Secure aggregation as a wrapper: only masked vectors leave an institution's host, the coordinator sees their sum.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017; the
arithmetic and the protocol's bytes are :mod:`agents.schemes.secagg`'s. The client half (:class:`Seal`,
a step of the round's ``LocalPlan.send``) turns each update into its masked vector on the host; the
server half unmasks the sum and hands the weighted mean to the wrapped scheme's server step, and
books the key agreement's extra bytes and round trips. It wraps schemes whose merge is a mean
(``averages``) over every key of the model: a robust rule (which must see single updates), compressed
changes (masks do not add up over them) and FedPer's partial uploads are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from agents.schemes import secagg
from agents.schemes.base import Cost, cost_of
from agents.wrappers.base import Wrapper, averaging
from sim.core.types import LocalPlan, RoundContext, State, Update


@dataclass(frozen=True)
class Seal:
    """The client half: the update's change (clipped to ``clip`` when > 0), times its weight, masked (secagg.seal)."""

    weighting: str = "samples"  # the weight: its sample count, or 1 (uniform)
    clip: float = 0.0  # > 0: the change is first clipped to this L2 norm (client-level DP under secure aggregation)

    def __call__(self, institution: Any, ctx: RoundContext, global_state: State | None, update: Update) -> Update:
        """What leaves the host instead of ``update``."""
        if not global_state:
            return update
        return secagg.seal(ctx, global_state, update, weighting=self.weighting, clip=self.clip)


class SecureAggregation(Wrapper):
    """An averaging scheme whose coordinator sees only the masked sum of the cohort's weighted changes."""

    group, option = "secagg", "masked"

    def fit(self, inner: Any) -> None:
        """A plain mean over full uploads, nothing compressed or ranked."""
        from agents.wrappers.robust import Robust

        if isinstance(inner, Robust):
            raise self.refuse(f"the coordinator sees only the masked sum, and aggregator={inner.option} needs every "
                              "update in the clear", "use aggregator=mean or secagg=none")
        if not averaging(inner):
            raise self.refuse("it does not merge by a mean of the updates", "use secagg=none with it")
        if not getattr(inner.plan(1).client, "whole", True):
            raise self.refuse("its institutions keep part of the model at home, and masks need every key of the "
                              "global state from every member", "use secagg=none with it")

    def plan(self, round: int) -> LocalPlan:
        """The inner scheme's local step; its update is sealed on the host before it leaves."""
        plan = self.inner.plan(round)
        return replace(plan, send=(*plan.send, Seal(weighting=self.inner.weighting)))

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """The inner scheme's server step towards the unmasked weighted mean; None if too few survived."""
        return self.inner.step_to(ctx, state, self.aggregate(ctx, state, updates))

    def aggregate(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> dict | None:
        """global + sum(w_i * change_i) / sum(w_i), both sums read off the masked vectors alone; None if nothing
        arrived or too few survived to unmask (the protocol loses the round)."""
        summed = secagg.masked_sum(ctx, state, updates)
        if summed is None or summed[1] <= 0:
            return None
        total, weight = summed
        return {k: np.asarray(state[k], np.float64) + v / weight for k, v in total.items()}

    def cost(self, ctx: RoundContext, updates: Sequence[Update]) -> Cost:
        """The inner scheme's cost plus the protocol's extra bytes and round trips per key-agreement member."""
        inner = cost_of(self.inner, ctx, updates)
        out = dict(inner.extras)
        members, arrived = secagg.members(ctx), {u.institution: u for u in updates}
        for name in members:
            u = arrived.get(name)
            words = int(np.size(u.state[secagg.MASKED])) if u is not None and u.state else 0
            up, down = secagg.overhead(len(members), words, u is not None)
            # the masked vector itself is the update's own upload (bytes_up); the rest is the protocol's
            out[name] = {"bytes_up": up - words * secagg.WORD_BYTES, "bytes_down": down,
                         "round_trips": secagg.EXTRA_ROUND_TRIPS}
        return replace(inner, extras=out)
