"""Federated averaging (FedAvg).

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017. Institutions run local SGD epochs
from the global model; the server replaces it with the sample-weighted mean of the
returned weights. ``server_lr`` generalises that step (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021): new = old + server_lr * (mean - old).

``merge`` swaps the mean for a robust rule of :mod:`agents.schemes.robust` (median,
trimmed mean, Krum, Multi-Krum, norm clipping); the server step is the same.
``secure_aggregation`` has the coordinator see only pairwise-masked updates and their sum
(Bonawitz et al. 2017, :mod:`agents.schemes.secagg`); it needs ``merge=mean``.
``compression`` (``topk`` with ``compression_ratio``, or ``int8``; :mod:`agents.schemes.compression`)
has institutions send their change in compressed form, with ``error_feedback`` carrying what
was dropped into the next round; :meth:`FedAvg.receive` turns uploads back into weights
before any merge, so every rule above reads them unchanged. Masks do not add up over
sparse or quantised changes, so compression refuses ``secure_aggregation``.
``stragglers`` says what an institution that misses ``engine.round_deadline_s`` does
(:mod:`sim.core.stragglers`): ``drop`` (the default, as in the paper: the round goes on without it)
or ``partial`` (it sends the local steps it finished).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from agents.schemes import compression as compress
from agents.schemes import privacy, robust, secagg
from agents.schemes.aggregate import server_step, weighted_average
from agents.schemes.base import Scheme, check_range, cohort_size, register, sample_cohort
from sim.core.stragglers import check_policy
from sim.core.types import ConfigError, LocalPlan, RoundContext, State, Update

WEIGHTINGS = ("samples", "uniform")
MERGES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_clip")
KRUM = ("krum", "multi_krum")

Rule = Callable[[State, list[State], list[float]], dict]


@register("fedavg")
class FedAvg(Scheme):
    """Average the cohort's weights (by samples or uniformly, or by a robust rule) and step the global model towards it."""

    def __init__(self, *, weighting: str = "samples", server_lr: float = 1.0, cohort_fraction: float = 1.0,
                 merge: str = "mean", trim: float = 0.2, byzantine: int = 1, krum_m: int = 1, clip_norm: float = 0.1,
                 secure_aggregation: bool = False, compression: str = "none", compression_ratio: float = 0.1,
                 error_feedback: bool = True, stragglers: str = "drop"):
        if weighting not in WEIGHTINGS:
            raise ConfigError("scheme.weighting", f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if merge not in MERGES:
            raise ConfigError("scheme.merge", f"unknown merge {merge!r}; use one of {', '.join(MERGES)}")
        if secure_aggregation and merge != "mean":
            raise ConfigError("scheme.secure_aggregation", f"the coordinator sees only the masked sum, and merge={merge} "
                              "needs every update in the clear; use scheme.merge=mean or secure_aggregation=false")
        if compression not in compress.METHODS:
            raise ConfigError("scheme.compression", f"unknown compression {compression!r}; use one of "
                              f"{', '.join(compress.METHODS)}")
        if compression != "none" and secure_aggregation:
            raise ConfigError("scheme.compression", f"secure aggregation's masks do not add up over {compression} "
                              "changes; use scheme.compression=none or scheme.secure_aggregation=false")
        self.stragglers = check_policy(stragglers)  # McMahan et al.: the server does not wait for late devices
        self.compression = compression
        self.compression_ratio = check_range("compression_ratio", compression_ratio, 0.0, 1.0, low_open=True)
        self.error_feedback = bool(error_feedback)
        self.weighting, self.merge_rule, self.secure_aggregation = weighting, merge, bool(secure_aggregation)
        self.server_lr = check_range("server_lr", server_lr, 0.0, low_open=True)
        self.cohort_fraction = check_range("cohort_fraction", cohort_fraction, 0.0, 1.0, low_open=True)
        self.trim = check_range("trim", trim, 0.0, 0.5)
        if self.trim >= 0.5:  # check_range's interval is closed; trimming half from each end leaves nothing
            raise ConfigError("scheme.trim", f"must lie in [0, 0.5), got {trim!r}")
        self.byzantine = int(check_range("byzantine", byzantine, 0.0))
        self.krum_m = int(check_range("krum_m", krum_m, 1.0))
        self.clip_norm = check_range("clip_norm", clip_norm, 0.0, low_open=True)
        self.rule: Rule = {
            "mean": lambda g, s, w: weighted_average(s, w),
            "median": lambda g, s, w: robust.coordinate_median(s),
            "trimmed_mean": lambda g, s, w: robust.trimmed_mean(s, self.trim),
            "krum": lambda g, s, w: robust.krum(s, self.byzantine),
            "multi_krum": lambda g, s, w: robust.krum(s, self.byzantine, self.krum_m),
            "norm_clip": lambda g, s, w: robust.norm_clip(g, s, w, self.clip_norm),
        }[merge]

    def plan(self, round: int) -> LocalPlan:
        """Plain local SGD from the global model; upload the weights (compressed, or sealed under masks, if asked)."""
        if self.secure_aggregation:
            return LocalPlan(secure_aggregation=True, secure_weighting=self.weighting)
        if self.compression == "none":
            return LocalPlan()
        return LocalPlan(compression=self.compression, compression_ratio=self.compression_ratio,
                         error_feedback=self.error_feedback)

    def receive(self, state: State, updates: Sequence[Update]) -> list[Update]:
        """Compressed uploads back to weights: global + the decompressed change (other keys as sent)."""
        if self.compression == "none":
            return list(updates)
        return [replace(u, state=compress.restore(state, u.state)) if u.state else u for u in updates]

    def check(self, institutions: int) -> None:
        """Refuse Krum settings the cohort can never satisfy (n > 2f + 2; Multi-Krum also m <= n - f)."""
        if self.merge_rule not in KRUM:
            return
        n = cohort_size(institutions, self.cohort_fraction)
        need = robust.krum_needs(self.byzantine)
        if n < need:
            raise ConfigError("scheme.byzantine", f"{self.merge_rule} with byzantine={self.byzantine} needs a cohort "
                              f"of more than 2f+2={need - 1} institutions, and each round selects {n} of {institutions}; "
                              f"lower scheme.byzantine, raise scheme.cohort_fraction or add institutions")
        if self.merge_rule == "multi_krum" and self.krum_m > n - self.byzantine:
            raise ConfigError("scheme.krum_m", f"multi_krum averages at most n - f = {n - self.byzantine} of the "
                              f"{n} selected institutions, got krum_m={self.krum_m}")

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """A ``cohort_fraction`` sample of institutions, fixed by (seed, round)."""
        self.check(len(ctx.cohort))
        return sample_cohort(ctx, self.cohort_fraction)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """The merge rule over the updates' (possibly partial) states, applied with ``server_lr`` (times the round's
        ``training.server_schedule`` factor); None if nothing usable arrived."""
        target = self.secure_aggregate(ctx, state, updates) if self.secure_aggregation else self.aggregate(state, updates)
        return None if target is None else self.step(state, target, self.server_lr * ctx.server_scale)

    def aggregate(self, state: State, updates: Sequence[Update]) -> dict | None:
        """The cohort's merged state under ``merge`` (the mean by default); None if nothing usable arrived."""
        usable = [u for u in updates if u.state and (self.weighting == "uniform" or u.num_samples > 0)]
        if not usable:
            return None
        if self.merge_rule in KRUM and len(usable) < robust.krum_needs(self.byzantine):
            raise ConfigError("scheme.byzantine", f"{self.merge_rule} with byzantine={self.byzantine} needs more than "
                              f"2f+2={2 * self.byzantine + 2} updates, and only {len(usable)} arrived this round (dropouts?); "
                              "lower scheme.byzantine")
        if self.merge_rule == "multi_krum" and self.krum_m > len(usable) - self.byzantine:
            raise ConfigError("scheme.krum_m", f"multi_krum averages at most n - f = {len(usable) - self.byzantine} of "
                              f"the {len(usable)} updates that arrived, got krum_m={self.krum_m}")
        weights = [1.0 if self.weighting == "uniform" else float(u.num_samples) for u in usable]
        return self.rule(state, [u.state for u in usable], weights)

    def secure_aggregate(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> dict | None:
        """The weighted mean under secure aggregation: global + sum(w_i * change_i) / sum(w_i), both sums read off the
        masked vectors the institutions' hosts sealed (:func:`secagg.seal`); None if nothing arrived or too few
        survived to unmask (the protocol loses the round)."""
        summed = secagg.masked_sum(ctx, state, updates)
        if summed is None or summed[1] <= 0:
            return None
        total, weight = summed
        return {k: np.asarray(state[k], np.float64) + v / weight for k, v in total.items()}

    def ledger(self, ctx: RoundContext, updates: Sequence[Update]) -> dict[str, dict]:
        """Secure aggregation's extra bytes and round trips per key-agreement member (see :func:`secagg.overhead`)."""
        if not self.secure_aggregation:
            return {}
        members, arrived = secagg.members(ctx), {u.institution: u for u in updates}
        out = {}
        for name in members:
            u = arrived.get(name)
            words = int(np.size(u.state[secagg.MASKED])) if u is not None and u.state else 0
            up, down = secagg.overhead(len(members), words, u is not None)
            # the masked vector itself is the update's own upload (bytes_up); the rest is the protocol's
            out[name] = {"bytes_up": up - words * secagg.WORD_BYTES, "bytes_down": down,
                         "round_trips": secagg.EXTRA_ROUND_TRIPS}
        return out

    def step(self, state: State, target: State, lr: float) -> State:
        """The server step towards the merged state: new = old + lr * (target - old)."""
        return server_step(state, target, lr)
