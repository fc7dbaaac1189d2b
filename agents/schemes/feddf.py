"""FedDF: ensemble distillation of the institutions' models at the coordinator, on unlabeled public data.

Lin, Kong, Stich, Jaggi, "Ensemble Distillation for Robust Model Fusion in Federated Learning",
NeurIPS 2020 (Algorithm 1, with the heterogeneous-model extension of its Section 3). Each round
the cohort starts from the global model of its own architecture and trains locally, as in
FedAvg, and uploads its weights. At the coordinator, for every architecture ("prototype") that
someone of the cohort trains:

1. the student starts as the sample-weighted average of that architecture's uploads (FedAvg within the group);
2. the teacher is the ensemble of *all* uploads, of every architecture: the mean of their logits on the public set;
3. the student is trained towards the teacher for ``distill_steps`` minibatches of the public set with Adam
   (the paper's optimiser; lr 1e-3), minimising the KL divergence of the softened outputs (``temperature``).

The paper stops distillation early on a validation set and runs up to 10^4 steps; here the
number of steps is fixed (cheap, deterministic, and no labelled server data needed). The
public set is ``data.public`` (:mod:`sim.core.data.public`): its labels are never read.
The global state holds one model per architecture, keyed ``<arch>/<key>``; each institution
receives its own architecture's model (booked as bytes down) and sends its weights (bytes up):
the distillation itself runs at the coordinator and crosses nothing. Institutions are scored
on their architecture's global model; the global row is the mean over institutions, as for
isolated training. With one architecture it is FedAvg followed by server-side distillation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from agents.schemes.aggregate import weighted_average
from agents.schemes.base import Client, Scheme, check_range, register, sample_cohort
from sim.core.distill import distil, logits
from sim.core.models import get_state, set_state
from sim.core.types import ConfigError, LocalPlan, RoundContext, State, Update

if TYPE_CHECKING:
    import torch

FEDDF_STREAM = 0xFEDDF
"""Third element of the RNG key of the coordinator's distillation minibatches: (seed, round, stream, architecture)."""


def check_count(key: str, value: int, low: int) -> int:
    """``value`` as an int >= ``low``, or ConfigError naming ``scheme.<key>``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"scheme.{key}", f"must be a whole number >= {low}, got {value!r}")
    return int(value)


def own_part(state: State | None, arch: str) -> State | None:
    """The part of a per-architecture global state that is ``arch``'s model, with its keys as the model names them."""
    if not state:
        return state
    prefix = f"{arch}/"
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@register("feddf")
class FedDF(Scheme):
    """FedAvg within each architecture, then distillation of each towards the ensemble of every upload's logits."""

    mixed_models = True

    def __init__(self, *, cohort_fraction: float = 1.0, distill_steps: int = 200, distill_lr: float = 1e-3,
                 batch_size: int = 64, temperature: float = 1.0):
        self.cohort_fraction = check_range("cohort_fraction", cohort_fraction, 0.0, 1.0, low_open=True)
        self.steps = check_count("distill_steps", distill_steps, 0)
        self.lr = check_range("distill_lr", distill_lr, 0.0, low_open=True)
        self.batch_size = check_count("batch_size", batch_size, 1)
        self.temperature = check_range("temperature", temperature, 0.0, low_open=True)
        self.public: np.ndarray | None = None
        self.archs: dict[str, str] = {}  # institution -> architecture
        self.models: dict[str, torch.nn.Module] = {}  # architecture -> the coordinator's working model

    def attach_public(self, x_public: np.ndarray, build: Callable[[str], Any], archs: Mapping[str, str],
                      state: State) -> State:
        """Keep the public inputs and a working model per architecture; start from each one's seeded weights."""
        self.public, self.archs = x_public, dict(archs)
        self.models = {arch: build(arch) for arch in sorted(set(archs.values()))}
        return {f"{arch}/{k}": v for arch, m in self.models.items() for k, v in get_state(m).items()}

    def plan(self, round: int) -> LocalPlan:
        """Local SGD from the own architecture's global model; upload the weights; score that model."""
        return LocalPlan(evaluate="personal", client=FedDFClient())

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """A ``cohort_fraction`` sample of institutions, fixed by (seed, round)."""
        return sample_cohort(ctx, self.cohort_fraction)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """Average each architecture's uploads, then distil each towards the mean logits of all uploads."""
        usable = [u for u in updates if u.state and u.num_samples > 0]
        if not usable or self.public is None:
            return None
        teacher = np.mean([self._logits(self.archs[u.institution], u.state) for u in usable], axis=0)  # scenario order
        new = dict(state)
        for n, arch in enumerate(self.models):
            group = [u for u in usable if self.archs[u.institution] == arch]
            if not group:  # nobody of this architecture trained: its model stays as it was
                continue
            model = self.models[arch]
            set_state(model, weighted_average([u.state for u in group], [float(u.num_samples) for u in group]))
            distil(model, self.public, teacher, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                   key=(ctx.seed, ctx.round, FEDDF_STREAM, n), temperature=self.temperature)
            new |= {f"{arch}/{k}": v for k, v in get_state(model).items()}
        return new

    def _logits(self, arch: str, weights: State) -> np.ndarray:
        """One upload's logits on the public set."""
        set_state(self.models[arch], weights)
        return logits(self.models[arch], self.public)


@dataclass(frozen=True)
class FedDFClient(Client):
    """FedDF's client half: FedAvg's local step on the global model of the institution's own architecture."""

    batchable = False  # each institution takes its own architecture's part of the global state
    whole = False  # no institution receives the whole global state: the global row averages institutions' scores

    def received(self, inst: Any, global_state: State | None) -> State | None:
        """Its own architecture's model."""
        return own_part(global_state, inst.spec.arch)

    def scored(self, inst: Any, plan: LocalPlan, global_state: State | None) -> State | None:
        """Its architecture's global model (what it received), not a personal one."""
        return global_state
