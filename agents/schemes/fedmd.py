"""FedMD: institutions share class scores on a public set, and each distils towards their consensus.

Li, Wang, "FedMD: Heterogenous Federated Learning via Model Distillation", NeurIPS 2019
Workshop on Federated Learning (Algorithm 1). Each institution keeps a model of its own (any
architecture; no weights ever cross). Every round:

1. communicate: each computes its class scores (logits) on the public set and sends them;
2. aggregate: the coordinator averages them into the consensus;
3. distribute: the consensus goes back to every institution;
4. digest: each trains its model towards the consensus on the public set (``digest_steps``
   minibatches, Adam at ``digest_lr``; ``loss=mae`` is the mean absolute error on the logits of
   the authors' code, ``kl`` the softened KL divergence);
5. revisit: each trains on its own private data for ``training.local_epochs`` epochs.

A round here runs 4-5 on the consensus of the round before (none in round 1) and then 1, so the
scores sent are those of the model after this round's training; the coordinator's merge is 2,
and the consensus travels to the next round's cohort in the round's plan (3). The paper's
first step, transfer learning on a *labelled* public set, is left out: here the public set
(``data.public``, :mod:`sim.core.data.public`) is unlabeled, and the paper's fresh random
subset of it each round is the whole of it every round. Only scores cross: n_public x classes
float32 up from each institution in the cohort, and the consensus of the same size down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from agents.schemes.base import Client, Scheme, Work, check_range, register, sample_cohort
from agents.schemes.feddf import check_count
from sim.core.distill import LOSSES, distil, logits
from sim.core.types import ConfigError, InstitutionSpec, LocalPlan, RoundContext, State, TrainingSpec, Update, spoken

if TYPE_CHECKING:
    import torch

WEIGHT_BEHAVIOURS = ("free_rider", "sign_flip", "scaled")
"""Behaviours (agents/behaviours.py) that act on the weights an institution sends."""
DIGEST_STREAM = 0xD16E57
"""Fourth element of the RNG key of an institution's digest step: (seed, institution, round, stream)."""


@register("fedmd")
class FedMD(Scheme):
    """Average the cohort's public-set scores into a consensus each institution digests before its private epochs."""

    mixed_models = True

    def __init__(self, *, cohort_fraction: float = 1.0, digest_steps: int = 50, digest_lr: float = 1e-3,
                 batch_size: int = 64, temperature: float = 1.0, loss: str = "kl"):
        self.cohort_fraction = check_range("cohort_fraction", cohort_fraction, 0.0, 1.0, low_open=True)
        self.steps = check_count("digest_steps", digest_steps, 0)
        self.lr = check_range("digest_lr", digest_lr, 0.0, low_open=True)
        self.batch_size = check_count("batch_size", batch_size, 1)
        self.temperature = check_range("temperature", temperature, 0.0, low_open=True)
        if loss not in LOSSES:
            raise ConfigError("scheme.loss", f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
        self.loss = loss
        self.consensus: np.ndarray | None = None  # the mean scores of the last round's cohort; None before any

    def check(self, specs: Sequence[InstitutionSpec]) -> None:
        """Behaviours that bend or withhold weights have no meaning when only scores cross: refuse them."""
        bent = [s for s in specs if s.behaviour in WEIGHT_BEHAVIOURS]
        if bent:
            raise ConfigError(f"scenario.institutions[{bent[0].index}].behaviour", f"fedmd sends scores, not weights, "
                              f"and {spoken(f'{s.name} ({s.behaviour})' for s in bent)} bend or withhold weights; use "
                              "honest, noisy_labels or data_poisoning with fedmd")

    def attach_public(self, x_public: np.ndarray, build: Any, archs: Any, state: State) -> None:
        """Nothing to keep at the coordinator: institutions score and digest the public set themselves."""
        return None

    def plan(self, round: int) -> LocalPlan:
        """Digest the consensus, revisit the private data, send scores; each institution is scored on its own model."""
        return LocalPlan(start="personal", evaluate="personal",
                         client=FedMDClient(self.consensus, self.steps, self.lr, self.batch_size, self.temperature,
                                            self.loss, round))

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """A ``cohort_fraction`` sample of institutions, fixed by (seed, round)."""
        return sample_cohort(ctx, self.cohort_fraction)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """The consensus: the plain mean of the scores that arrived (scenario order); the global state is untouched."""
        scores = [np.asarray(u.state["scores"]) for u in updates if "scores" in u.state]
        if scores:
            self.consensus = np.mean(scores, axis=0).astype(np.float32)
        return None

    def state(self) -> dict[str, np.ndarray]:
        """The consensus, for checkpoints."""
        return {} if self.consensus is None else {"consensus": self.consensus}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue with a checkpoint's consensus."""
        self.consensus = np.asarray(arrays["consensus"]) if "consensus" in arrays else None


@dataclass(frozen=True)
class FedMDClient(Client):
    """FedMD's client half: digest the consensus, revisit the own shard, send the model's scores on the public set."""

    batchable = False  # a digest step before the local one, and scores sent instead of weights
    whole = False  # nothing of the model is sent: the global row averages institutions' own models

    consensus: np.ndarray | None = None  # what arrived from the coordinator (None in round 1)
    steps: int = 50
    lr: float = 1e-3
    batch_size: int = 64
    temperature: float = 1.0
    loss: str = "kl"
    round: int = 0  # the planned round: seeds the digest step's minibatches

    def local_step(self, inst: Any, model: torch.nn.Module, start: State, training: TrainingSpec, key: tuple[int, ...],
                   cap: int | None) -> Work:
        """Digest (towards the consensus on the public set), revisit (local SGD on the own shard), then score."""
        public, digested = inst.public, 0
        if public is None:
            raise ConfigError("data.public", "fedmd needs an unlabeled public set; set data.public={source: heldout, "
                              "rows: N}")
        if self.consensus is not None:
            _, steps = distil(model, public, self.consensus, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                              key=(inst.seed, inst.spec.index, self.round, DIGEST_STREAM),
                              temperature=self.temperature, loss=self.loss)
            digested = steps * min(self.batch_size, len(public))
        work = inst.sgd(model, training, key, cap)
        work.processed += digested + len(public)  # the digest's passes and the scoring pass (forward only, counted whole)
        work.payload = {"scores": logits(model, public)}
        return work

    def bytes_down(self, plan: LocalPlan, global_state: State | None, kept: Sequence[str] = ()) -> int:
        """The consensus it received (nothing in round 1)."""
        return 0 if self.consensus is None else int(self.consensus.nbytes)

    def scored(self, inst: Any, plan: LocalPlan, global_state: State | None) -> State | None:
        """Its own model."""
        return inst.personal
