"""Compression of uploads as a wrapper: each institution sends its change as top-k values or int8 codes.

The maths is :mod:`agents.schemes.compression`'s (top-k sparsification, Aji & Heafield 2017; 8-bit
quantisation, Alistarh et al. 2017; error feedback, Seide et al. 2014 / Karimireddy et al. 2019).
The client half (:class:`Compress`, a step of the round's ``LocalPlan.send``) compresses the change
from the global model on the host, adding the residual that error feedback carries (the
institution's persistent state); the server half turns uploads back into weights before the
wrapped scheme merges, so every merge reads them unchanged and the ledger books the compressed
bytes. It wraps any scheme that uploads weights; secure aggregation is refused (masks do not add up
over sparse or quantised changes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from agents.schemes import compression
from agents.wrappers.base import Wrapper, layers
from sim.core.types import ConfigError, LocalPlan, RoundContext, State, Update, state_nbytes


@dataclass(frozen=True)
class Compress:
    """The client half: a weights upload's floating arrays sent as their compressed change from the global model."""

    method: str  # topk | int8
    ratio: float = 1.0  # topk: fraction of each array's entries sent
    error_feedback: bool = True  # add what compression dropped to the next round's change (kept by the institution)

    def __call__(self, institution: Any, ctx: RoundContext, global_state: State | None, update: Update) -> Update:
        """What leaves the host instead of ``update``; a free-rider sends its compressed nothing and keeps no residual."""
        payload = update.state
        if ctx.plan.upload != "weights" or not global_state or not payload:
            return update
        change = {}
        for k, v in payload.items():
            v = np.asarray(v)
            if k in global_state and np.issubdtype(v.dtype, np.floating):
                change[k] = (v.astype(np.float64) - np.asarray(global_state[k], np.float64)).astype(v.dtype)
        rest = {k: v for k, v in payload.items() if k not in change}
        if self.error_feedback and not institution.free_rides(ctx.plan):
            sent, institution.residual = compression.with_feedback(change, institution.residual, self.method,
                                                                   self.ratio)
            institution.changed = True
        else:
            sent = compression.compress(change, self.method, self.ratio)
        state = {**rest, **sent}
        return replace(update, state=state, bytes_up=state_nbytes(state))


class Compression(Wrapper):
    """A scheme whose institutions send compressed changes; restored to weights before the scheme merges them."""

    group = "compression"

    def __init__(self, inner: Any, *, method: str = "topk", ratio: float = 0.1, error_feedback: bool = True):
        if method not in compression.METHODS or method == "none":
            raise ConfigError("compression.method", f"unknown compression {method!r}; use one of topk, int8 "
                              "(or compression=none)")
        if not 0.0 < float(ratio) <= 1.0:
            raise ConfigError("compression.ratio", f"must lie in (0.0, 1.0], got {ratio!r}")
        self.option, self.method, self.ratio, self.error_feedback = method, method, float(ratio), bool(error_feedback)
        super().__init__(inner)

    def fit(self, inner: Any) -> None:
        """A scheme that uploads weights, not under secure aggregation."""
        from agents.wrappers.secagg import SecureAggregation

        if any(isinstance(w, SecureAggregation) for w in layers(inner)):
            raise self.refuse(f"secure aggregation's masks do not add up over {self.method} changes",
                              "use compression=none or secagg=none")
        upload = inner.plan(1).upload
        if upload != "weights":
            raise self.refuse(f"its institutions upload {upload}, not weights to take a change from",
                              "use compression=none with it")

    def plan(self, round: int) -> LocalPlan:
        """The inner scheme's local step; the update is compressed on the host before it leaves."""
        plan = self.inner.plan(round)
        return replace(plan, send=(*plan.send, Compress(self.method, self.ratio, self.error_feedback)))

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """The inner scheme's merge of the uploads turned back into weights (global + the decompressed change; other
        keys as sent)."""
        return self.inner.merge(ctx, state, restored(state, updates))


def restored(state: State, updates: Sequence[Update]) -> list[Update]:
    """Compressed uploads as the weights they stand for; empty ones as they are."""
    return [replace(u, state=compression.restore(state, u.state)) if u.state else u for u in updates]
