"""Robust merge rules as wrappers: the cohort's mean of an averaging scheme replaced by a rule few cheats can steer.

The rules are the pure functions of :mod:`agents.schemes.robust` (Yin et al. 2018: coordinate median
and trimmed mean; Blanchard et al. 2017: Krum and Multi-Krum; Sun et al. 2019: norm clipping); the
server step (``server_lr``, the server optimiser) stays the wrapped scheme's. They wrap schemes whose
merge is FedAvg's (``averages``): fedavg, fedprox, fedavgm, fedadam, fedyogi, ditto, fedper, finetune,
reptile, compute_share. Median, trimmed mean and Krum count every institution once, whatever sample
count it claims: a claim is exactly what a cheat can inflate (norm clipping keeps the scheme's weights).
``aggregator=mean`` (the default) wraps nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from agents.schemes import robust
from agents.schemes.base import checked, cohort_size
from agents.wrappers.base import Wrapper, averaging
from sim.core.config import warn_once
from sim.core.types import ConfigError, InstitutionSpec, RoundContext, State, Update

log = logging.getLogger("collabsim")


class Robust(Wrapper):
    """An averaging scheme whose mean is replaced by a robust rule (subclasses: which rule)."""

    group = "aggregator"

    def fit(self, inner: Any) -> None:
        """Only a scheme that merges by a mean has a mean to replace."""
        if not averaging(inner):
            raise self.refuse("it does not merge by a mean of the updates (its merge is its own)",
                              "use aggregator=mean with it, or a scheme of FedAvg's family")

    def rule(self, state: State, states: list[State], weights: list[float]) -> dict:
        """The robust merge of ``states`` (in scenario order)."""
        raise NotImplementedError

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """The rule over the usable updates, applied by the inner scheme's server step; None if none is usable."""
        usable = self.inner.usable(updates)
        if usable and not self.enough(ctx, len(usable)):
            return None  # the previous model stands: a rule is not run on fewer updates than it needs
        return self.inner.step_to(ctx, state, self.aggregate(state, updates))

    def aggregate(self, state: State, updates: Sequence[Update]) -> dict | None:
        """The rule over what arrived; None if nothing usable did."""
        usable = self.inner.usable(updates)
        if not usable:
            return None
        return self.rule(state, [u.state for u in usable], self.inner.weights(usable))

    def enough(self, ctx: RoundContext, n: int) -> bool:
        """Whether ``n`` updates that arrived this round are enough for the rule (most rules work with any)."""
        return True


class Median(Robust):
    """The coordinate-wise median of the cohort's states."""

    option = "median"

    def rule(self, state: State, states: list[State], weights: list[float]) -> dict:
        return robust.coordinate_median(states)


class TrimmedMean(Robust):
    """Per coordinate, the mean after dropping the ``trim`` fraction of highest and of lowest values."""

    option = "trimmed_mean"

    def __init__(self, inner: Any, *, trim: float = 0.2):
        if not 0.0 <= float(trim) < 0.5:  # trimming half from each end would leave nothing
            raise ConfigError("aggregator.trim", f"must lie in [0, 0.5), got {trim!r}")
        self.trim = float(trim)
        super().__init__(inner)

    def check(self, specs: Sequence[InstitutionSpec]) -> None:
        """Refuse a fraction that trims no institution from a cohort this size: the merge would be the plain mean."""
        checked(self.inner, specs)
        n = cohort_size(len(specs), self.inner.cohort_fraction)
        if self.trim > 0 and math.floor(self.trim * n) == 0:
            raise ConfigError("aggregator.trim", f"{self.trim:g} of a cohort of {n} trims floor({self.trim:g} * {n}) = 0 "
                              f"institutions from each end, so the merge is the plain mean; raise it to at least "
                              f"1/{n} = {1 / n:.3g}, or use aggregator=mean")
        if self.trim == 0:
            warn_once("warning: aggregator.trim: 0 trims nothing, so trimmed_mean is the plain mean (aggregator=mean)")

    def rule(self, state: State, states: list[State], weights: list[float]) -> dict:
        return robust.trimmed_mean(states, self.trim)


class Krum(Robust):
    """Krum: the state closest to its n - f - 2 nearest neighbours, when up to ``byzantine`` (f) may lie."""

    option = "krum"

    def __init__(self, inner: Any, *, byzantine: int = 1):
        if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
            raise ConfigError("aggregator.byzantine", f"must be a whole number >= 0, got {byzantine!r}")
        self.byzantine = byzantine
        self.m = 1
        super().__init__(inner)

    def check(self, specs: Sequence[InstitutionSpec]) -> None:
        """Refuse settings the cohort can never satisfy, before any actor starts (Checks); warn when dropouts can
        leave a round short, since such a round keeps the previous model."""
        checked(self.inner, specs)
        self.cohort(len(specs))
        flaky = [s for s in specs if getattr(s, "availability", 1.0) < 1.0 or getattr(s, "failure_rate", 0.0) > 0.0]
        n = cohort_size(len(specs), self.inner.cohort_fraction)
        if flaky and n - len(flaky) < self.needs():
            warn_once(f"warning: aggregator: {self.option} with byzantine={self.byzantine} needs {self.needs()} "
                      f"updates in a round and {len(flaky)} of the {len(specs)} institutions may drop out "
                      "(scenario.availability / failure_rate): a round that ends short keeps the previous global model")

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """The inner scheme's cohort, after checking Krum can work with a cohort drawn from this many institutions."""
        self.cohort(len(ctx.cohort))
        return self.inner.select(ctx)

    def cohort(self, institutions: int) -> None:
        """Refuse a cohort drawn from ``institutions`` that can never satisfy n > 2f + 2 (Multi-Krum also m <= n - f)."""
        n = cohort_size(institutions, self.inner.cohort_fraction)
        self.fits(n, f"a cohort of more than 2f+2={2 * self.byzantine + 2} institutions, and each round selects {n} of "
                     f"{institutions}", "selected institutions",
                  "lower aggregator.byzantine, raise scheme.cohort_fraction or add institutions")

    def needs(self) -> int:
        """Fewest updates a round needs: n > 2f + 2, and Multi-Krum's m <= n - f (m None: n - f itself)."""
        return max(robust.krum_needs(self.byzantine), (self.m or 1) + self.byzantine)

    def enough(self, ctx: RoundContext, n: int) -> bool:
        """A round that dropouts left with fewer updates than Krum needs keeps the previous model, with a warning
        (the cohort itself was checked before the run: only dropouts can make a round short)."""
        if n >= self.needs():
            return True
        log.warning("round %d: %s with byzantine=%d needs %d updates and %d arrived (dropouts); the global model is "
                    "kept this round", ctx.round, self.option, self.byzantine, self.needs(), n)
        return False

    def fits(self, n: int, shortfall: str, of: str, fix: str) -> None:
        """Refuse ``n`` states (``of`` what): Krum needs more than 2f + 2 (``shortfall`` says so), Multi-Krum m <= n - f."""
        if n < robust.krum_needs(self.byzantine):
            raise ConfigError("aggregator.byzantine", f"{self.option} with byzantine={self.byzantine} needs {shortfall}; {fix}")
        if self.m is not None and self.m > n - self.byzantine:
            raise ConfigError("aggregator.krum_m", f"multi_krum averages at most n - f = {n - self.byzantine} of the "
                              f"{n} {of}, got krum_m={self.m}")

    def rule(self, state: State, states: list[State], weights: list[float]) -> dict:
        return robust.krum(states, self.byzantine, self.m or len(states) - self.byzantine)


class MultiKrum(Krum):
    """Multi-Krum: the plain mean of the ``krum_m`` states with the best Krum scores (None: n - f of the n that arrived,
    every update but the f the rule must assume lie; m = 1 is Krum itself)."""

    option = "multi_krum"

    def __init__(self, inner: Any, *, byzantine: int = 1, krum_m: int | None = None):
        if krum_m is not None and (isinstance(krum_m, bool) or not isinstance(krum_m, int) or krum_m < 1):
            raise ConfigError("aggregator.krum_m", f"must be a whole number >= 1 (or null for n - f), got {krum_m!r}")
        super().__init__(inner, byzantine=byzantine)
        self.m = krum_m


class NormClip(Robust):
    """Each update's change to the global model clipped to L2 norm ``clip_norm`` before the (weighted) mean."""

    option = "norm_clip"

    def __init__(self, inner: Any, *, clip_norm: float = 0.1):
        if not float(clip_norm) > 0:
            raise ConfigError("aggregator.clip_norm", f"must lie in (0.0, inf], got {clip_norm!r}")
        self.clip_norm = float(clip_norm)
        super().__init__(inner)

    def rule(self, state: State, states: list[State], weights: list[float]) -> dict:
        return robust.norm_clip(state, states, weights, self.clip_norm)
