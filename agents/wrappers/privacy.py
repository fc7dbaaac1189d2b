"""Client-level differential privacy as a wrapper (DP-FedAvg's mechanism around any averaging scheme).

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR
2018. Each round every institution joins the cohort independently with probability ``q`` (the
wrapped scheme's ``cohort_fraction``; Poisson sampling, as the accountant assumes); each change to
the global model is clipped to L2 norm ``clip_norm``; the coordinator takes the fixed-denominator
mean (sum / (q N), every institution weighted 1) and adds Gaussian noise of std
``noise_multiplier * clip_norm / (q N)``, then the wrapped scheme's server step moves towards it.
The maths is :mod:`agents.schemes.privacy`'s; epsilon comes from dp-accounting's RDP accountant,
and the noise multiplier is either given or solved there for ``target_epsilon`` over
``planned_rounds``. Under secure aggregation each host clips its own change before sealing it.

``privacy=client_dp`` wraps the configured scheme; ``scheme=dp_fedavg``
(:class:`agents.schemes.dp_fedavg.DPFedAvg`) is the paper's preset, FedAvg with one vote per
institution under this wrapper.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, ClassVar, Sequence

import numpy as np

from agents.schemes import privacy, secagg
from agents.schemes.base import Cost, checked, cost_of
from agents.wrappers.base import Wrapper, averaging
from agents.wrappers.secagg import Seal, SecureAggregation
from sim.core.types import ConfigError, InstitutionSpec, LocalPlan, RoundContext, State, Update

log = logging.getLogger("collabsim")
SAMPLING_STREAM = 0xD95A
"""Last element of the Poisson-sampling RNG key."""


class ClientDP(Wrapper):
    """An averaging scheme with clipped changes, Poisson-sampled cohorts and Gaussian noise; epsilon in the ledger."""

    group, option = "privacy", "client_dp"
    prefix: ClassVar[str] = "privacy"  # where its keys live in the config (the dp_fedavg preset: scheme)

    def __init__(self, inner: Any, *, clip_norm: float | None = 0.5, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, delta: float = 1e-5, planned_rounds: int = 20):
        key = f"{self.prefix}."
        if noise_multiplier is not None and target_epsilon is not None:
            raise ConfigError(key + "target_epsilon", f"give {key}noise_multiplier or {key}target_epsilon, not both "
                              "(set the other to null)")
        if noise_multiplier is None and target_epsilon is None:
            raise ConfigError(key + "noise_multiplier", f"client-level DP needs {key}noise_multiplier or "
                              f"{key}target_epsilon")
        if clip_norm is None or not float(clip_norm) > 0:
            raise ConfigError(key + "clip_norm", f"DP noise is calibrated to a clipping norm: set {key}clip_norm > 0 "
                              f"(got {clip_norm!r})")
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(key + "delta", f"must lie in (0, 1) (typically below 1 / institutions), got {delta!r}")
        if isinstance(planned_rounds, bool) or not isinstance(planned_rounds, int) or planned_rounds < 1:
            raise ConfigError(key + "planned_rounds", f"must lie in [1.0, inf], got {planned_rounds!r}")
        self.planned_rounds = planned_rounds
        super().__init__(inner)
        self.q = self.base.cohort_fraction
        if target_epsilon is not None:
            eps = float(target_epsilon)
            if not (eps > 0 and math.isfinite(eps)):
                raise ConfigError(key + "target_epsilon", f"must be a finite number > 0, got {target_epsilon!r}")
            try:
                noise_multiplier = privacy.solve_noise(eps, self.delta, self.q, self.planned_rounds)
            except (ValueError, RuntimeError) as e:
                raise ConfigError(key + "target_epsilon", f"no noise multiplier up to {privacy.MAX_NOISE:g} reaches "
                                  f"epsilon {eps} in {self.planned_rounds} rounds ({e}); raise it") from None
        self.target_epsilon = target_epsilon
        if not float(noise_multiplier) > 0:
            raise ConfigError(key + "noise_multiplier", f"must lie in (0.0, inf], got {noise_multiplier!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.population = 0  # institutions the cohort is sampled from (set by check and select)

    def fit(self, inner: Any) -> None:
        """A scheme that averages (secure aggregation between them allowed); never a robust rule."""
        from agents.wrappers.robust import Robust

        base = inner.inner if isinstance(inner, SecureAggregation) else inner
        if isinstance(base, Robust):
            raise self.refuse(f"its noise is calibrated to a sum of clipped changes, and aggregator={base.option} "
                              "does not sum them", "use aggregator=mean")
        if not averaging(base):
            raise self.refuse("it does not merge by a mean of the updates", "use privacy=none with it")
        self.base = base  # the averaging scheme: its cohort_fraction is q, its step applies the noised mean

    def plan(self, round: int) -> LocalPlan:
        """The inner scheme's local step; under secure aggregation each host clips its change before sealing it."""
        plan = self.inner.plan(round)
        return replace(plan, send=tuple(replace(s, clip=self.clip_norm) if isinstance(s, Seal) else s for s in plan.send))

    def check(self, specs: Sequence[InstitutionSpec]) -> None:
        """Remember how many institutions the cohort is sampled from (the noise is scaled by q * N); refuse a delta
        of 1 / institutions or more, which a mechanism can meet by publishing one institution's update outright."""
        checked(self.inner, specs)
        self.population = len(specs)
        if specs and self.delta >= 1.0 / len(specs):
            raise ConfigError(f"{self.prefix}.delta", f"is {self.delta:g}, not below 1 / institutions = 1/{len(specs)} "
                              f"= {1.0 / len(specs):.3g}; lower it (e.g. {self.prefix}.delta=1e-5)")

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """Poisson sampling: each institution independently with probability q, fixed by (seed, round)."""
        self.population = len(ctx.cohort)
        if self.q >= 1.0:
            return ctx.cohort
        draws = np.random.default_rng([ctx.seed, ctx.round, SAMPLING_STREAM]).random(len(ctx.cohort))
        return tuple(name for name, x in zip(ctx.cohort, draws) if x < self.q)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """global + server_lr * (sum of clipped changes / (q N) + noise); the noise is released even for an empty cohort.

        Keeping the previous model when no update arrived would tell anyone watching the model that nobody took part
        that round, which the accountant's epsilon does not cover (with one institution it gives away whether it
        trained): the model moves by noise alone then, and the log says so."""
        if self.population <= 0:
            raise RuntimeError("ClientDP.merge before select: the population size is unknown")
        expected = self.q * self.population
        usable = [u for u in updates if u.state]
        if not usable:
            log.warning("round %d: no update arrived; the privacy noise is released all the same (an unchanged model "
                        "would reveal that nobody took part), so the global model moves by noise alone this round",
                        ctx.round)
        if isinstance(self.inner, SecureAggregation) and usable:  # each host clipped and sealed its change (Seal.clip)
            summed = secagg.masked_sum(ctx, state, usable)
            if summed is None:  # too few survived to unmask: the protocol loses the round, nothing is released
                return None
            clipped = [summed[0]]
        else:
            clipped = [privacy.clip(privacy.delta(state, u.state), self.clip_norm) for u in usable]
        std = privacy.noise_std(self.noise_multiplier, self.clip_norm, expected)
        noise = privacy.gaussian_noise(state, std, ctx.seed, ctx.round)
        target = privacy.noised_mean(state, clipped, expected, noise)
        return self.base.step_to(ctx, state, target)

    def epsilon(self, round: int) -> float:
        """Epsilon spent after ``round`` rounds (dp-accounting, RDP), the same for every institution under client-level DP."""
        return privacy.epsilon(self.noise_multiplier, self.q, round, self.delta)

    def cost(self, ctx: RoundContext, updates: Sequence[Update]) -> Cost:
        """The inner scheme's cost (secure aggregation's bytes), and the epsilon spent after this round."""
        return replace(cost_of(self.inner, ctx, updates), epsilon=self.epsilon(ctx.round))
