"""Federated averaging (FedAvg).

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017. Institutions run local SGD epochs
from the global model; the server replaces it with the sample-weighted mean of the
returned weights. ``server_lr`` generalises that step (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021): new = old + server_lr * (mean - old).

``merge`` swaps the mean for a robust rule of :mod:`agents.schemes.robust` (median,
trimmed mean, Krum, Multi-Krum, norm clipping); the server step is the same.
"""

from __future__ import annotations

from typing import Callable, Sequence

from agents.schemes import robust
from agents.schemes.aggregate import server_step, weighted_average
from agents.schemes.base import Scheme, check_range, cohort_size, register, sample_cohort
from sim.types import ConfigError, LocalPlan, RoundContext, State, Update

WEIGHTINGS = ("samples", "uniform")
MERGES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_clip")
KRUM = ("krum", "multi_krum")

Rule = Callable[[State, list[State], list[float]], dict]


@register("fedavg")
class FedAvg(Scheme):
    """Average the cohort's weights (by samples or uniformly, or by a robust rule) and step the global model towards it."""

    def __init__(self, *, weighting: str = "samples", server_lr: float = 1.0, cohort_fraction: float = 1.0,
                 merge: str = "mean", trim: float = 0.2, byzantine: int = 1, krum_m: int = 1, clip_norm: float = 0.1):
        if weighting not in WEIGHTINGS:
            raise ConfigError("scheme.weighting", f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if merge not in MERGES:
            raise ConfigError("scheme.merge", f"unknown merge {merge!r}; use one of {', '.join(MERGES)}")
        self.weighting, self.merge_rule = weighting, merge
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
        """Plain local SGD from the global model; upload the weights."""
        return LocalPlan()

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
        target = self.aggregate(state, updates)
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

    def step(self, state: State, target: State, lr: float) -> State:
        """The server step towards the merged state: new = old + lr * (target - old)."""
        return server_step(state, target, lr)
