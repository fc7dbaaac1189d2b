"""Client-level differentially private FedAvg (DP-FedAvg).

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018. Each round every institution joins the cohort independently with
probability ``q = cohort_fraction`` (Poisson sampling, as the accountant assumes); each
change to the global model is clipped to L2 norm ``clip_norm``; the coordinator takes
the fixed-denominator mean (sum / (q N), every institution weighted 1) and adds Gaussian
noise of std ``noise_multiplier * clip_norm / (q N)``. The maths is in
:mod:`agents.schemes.privacy`; epsilon comes from dp-accounting's RDP accountant, and the
noise multiplier is either given or solved there for ``target_epsilon`` over
``planned_rounds``. With ``secure_aggregation`` the clipped changes are summed under masks.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from agents.schemes import privacy, secagg
from agents.schemes.base import check_range, register
from agents.schemes.fedavg import FedAvg
from sim.core.types import ConfigError, LocalPlan, RoundContext, State, Update

SAMPLING_STREAM = 0xD95A
"""Last element of the Poisson-sampling RNG key."""


@register("dp_fedavg")
class DPFedAvg(FedAvg):
    """FedAvg with clipped changes, Poisson-sampled cohorts and Gaussian noise at the coordinator; epsilon in the ledger."""

    def __init__(self, *, clip_norm: float | None = 0.5, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, delta: float = 1e-5, cohort_fraction: float = 1.0,
                 planned_rounds: int = 20, server_lr: float = 1.0, secure_aggregation: bool = False, compression: str = "none", compression_ratio: float = 0.1, error_feedback: bool = True):
        if noise_multiplier is not None and target_epsilon is not None:
            raise ConfigError("scheme.target_epsilon", "give scheme.noise_multiplier or scheme.target_epsilon, not both "
                              "(set the other to null)")
        if noise_multiplier is None and target_epsilon is None:
            raise ConfigError("scheme.noise_multiplier", "DP-FedAvg needs scheme.noise_multiplier or scheme.target_epsilon")
        if clip_norm is None or not float(clip_norm) > 0:
            raise ConfigError("scheme.clip_norm", f"DP noise is calibrated to a clipping norm: set scheme.clip_norm > 0 "
                              f"(got {clip_norm!r})")
        super().__init__(weighting="uniform", server_lr=server_lr, cohort_fraction=cohort_fraction, clip_norm=clip_norm,
                         secure_aggregation=secure_aggregation, compression=compression, compression_ratio=compression_ratio, error_feedback=error_feedback)
        self.delta = float(delta)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError("scheme.delta", f"must lie in (0, 1) (typically below 1 / institutions), got {delta!r}")
        self.planned_rounds = int(check_range("planned_rounds", planned_rounds, 1.0))
        if target_epsilon is not None:
            eps = float(target_epsilon)
            if not (eps > 0 and math.isfinite(eps)):
                raise ConfigError("scheme.target_epsilon", f"must be a finite number > 0, got {target_epsilon!r}")
            try:
                noise_multiplier = privacy.solve_noise(eps, self.delta, self.cohort_fraction, self.planned_rounds)
            except (ValueError, RuntimeError) as e:
                raise ConfigError("scheme.target_epsilon", f"no noise multiplier up to {privacy.MAX_NOISE:g} reaches "
                                  f"epsilon {eps} in {self.planned_rounds} rounds ({e}); raise it") from None
        self.target_epsilon = target_epsilon
        self.noise_multiplier = check_range("noise_multiplier", noise_multiplier, 0.0, low_open=True)
        self.population = 0  # institutions the cohort is sampled from (set by check and select)

    def plan(self, round: int) -> LocalPlan:
        """FedAvg's plan; under secure aggregation each institution clips its own change before sealing it."""
        plan = super().plan(round)
        return replace(plan, secure_clip=self.clip_norm) if plan.secure_aggregation else plan

    def check(self, institutions: int) -> None:
        """Remember how many institutions the cohort is sampled from (the noise is scaled by q * N)."""
        self.population = institutions

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """Poisson sampling: each institution independently with probability ``cohort_fraction``, fixed by (seed, round)."""
        self.population = len(ctx.cohort)
        if self.cohort_fraction >= 1.0:
            return ctx.cohort
        draws = np.random.default_rng([ctx.seed, ctx.round, SAMPLING_STREAM]).random(len(ctx.cohort))
        return tuple(name for name, x in zip(ctx.cohort, draws) if x < self.cohort_fraction)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """global + server_lr * (sum of clipped changes / (q N) + noise); the noise is released even for an empty cohort."""
        if self.population <= 0:
            raise RuntimeError("DPFedAvg.merge before select: the population size is unknown")
        expected = self.cohort_fraction * self.population
        usable = [u for u in updates if u.state]
        if self.secure_aggregation and usable:  # each host clipped and sealed its change (plan.secure_clip)
            summed = secagg.masked_sum(ctx, state, usable)
            if summed is None:  # too few survived to unmask: the protocol loses the round, nothing is released
                return None
            clipped = [summed[0]]
        else:
            clipped = [privacy.clip(privacy.delta(state, u.state), self.clip_norm) for u in usable]
        std = privacy.noise_std(self.noise_multiplier, self.clip_norm, expected)
        noise = privacy.gaussian_noise(state, std, ctx.seed, ctx.round)
        target = privacy.noised_mean(state, clipped, expected, noise)
        return self.step(state, target, self.server_lr * ctx.server_scale)

    def epsilon(self, round: int) -> float:
        """Epsilon spent after ``round`` rounds (dp-accounting, RDP), the same for every institution under client-level DP."""
        return privacy.epsilon(self.noise_multiplier, self.cohort_fraction, round, self.delta)
