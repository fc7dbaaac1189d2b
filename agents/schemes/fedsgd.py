"""Federated SGD (FedSGD): one full-shard gradient per institution per round.

The baseline of McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017: each institution computes the gradient of its mean
loss at the global model; the server takes one step along the sample-weighted mean
gradient (equal to the full-batch gradient of the pooled data when everyone takes part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from agents.schemes.aggregate import apply_gradient, weighted_average
from agents.schemes.base import Client, Scheme, Work, check_range, register, sample_cohort
from sim.core.train import full_gradient
from sim.core.types import LocalPlan, RoundContext, State, TrainingSpec, Update

if TYPE_CHECKING:
    import torch


@register("fedsgd")
class FedSGD(Scheme):
    """Average the cohort's full-shard gradients by samples and take one server SGD step."""

    # 0.5: a full-batch gradient is far less noisy than a minibatch one, so a step ten times
    # the local SGD default (0.05) stays stable on the small models here while one step per
    # round still makes visible progress in a 20-round run.
    def __init__(self, *, server_lr: float = 0.5, cohort_fraction: float = 1.0):
        self.server_lr = check_range("server_lr", server_lr, 0.0, low_open=True)
        self.cohort_fraction = check_range("cohort_fraction", cohort_fraction, 0.0, 1.0, low_open=True)

    def plan(self, round: int) -> LocalPlan:
        """One full-shard gradient at the global model, uploaded instead of weights."""
        return LocalPlan(upload="gradient", client=GradientClient())

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """A ``cohort_fraction`` sample of institutions, fixed by (seed, round)."""
        return sample_cohort(ctx, self.cohort_fraction)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """global - server_lr * (sample-weighted mean gradient); None if no gradient arrived."""
        usable = [u for u in updates if u.state and u.num_samples > 0]
        if not usable:
            return None
        grad = weighted_average([u.state for u in usable], [float(u.num_samples) for u in usable])
        return apply_gradient(state, grad, self.server_lr * ctx.server_scale)


@dataclass(frozen=True)
class GradientClient(Client):
    """FedSGD's client half: the gradient of the mean loss over the whole shard at the received model, no step."""

    batchable = False  # one full-batch gradient, not local SGD
    local_sgd = False  # so DP-SGD, which privatises SGD steps, has nothing to work on

    def local_step(self, inst: Any, model: torch.nn.Module, start: State, training: TrainingSpec, key: tuple[int, ...],
                   cap: int | None) -> Work:
        """The full-shard gradient (named like the model's parameters) and that loss; every sample processed once."""
        shard = inst.shard
        gradient, loss = full_gradient(model, shard.x_train, shard.y_train, precision=inst.training.precision)
        return Work(gradient, loss, 0, shard.num_train, shard.num_train)

    def after(self, inst: Any, model: torch.nn.Module, plan: LocalPlan, global_state: State | None, work: Work,
              round: int, training: TrainingSpec) -> None:
        """Nothing to keep: no step was taken."""
