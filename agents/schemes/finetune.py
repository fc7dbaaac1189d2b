"""Federated training, then local fine-tuning: FedAvg whose merged model each institution adapts before use.

The "FedAvg + fine-tuning" personalisation baseline (Wang, Mathews, Kiddon, Eichner,
Beaufays, Ramage, "Federated Evaluation of On-device Personalization", arXiv:1910.10252,
2019; Yu, Bagdasaryan, Shmatikov, "Salvaging Federated Learning by Local Adaptation",
arXiv:2002.04758, 2020). Training is FedAvg's. Before it is scored each round, every
institution fine-tunes a copy of the merged model on its own training data for
``finetune_steps`` minibatch steps (or ``finetune_epochs`` epochs); the copy is neither
uploaded nor kept, so the global model is exactly FedAvg's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.schemes.base import Client, register
from agents.schemes.fedavg import FedAvg
from sim.core.train import local_train, rng_for
from sim.core.types import ConfigError, LocalPlan

if TYPE_CHECKING:
    import torch


def check_count(key: str, value: int) -> int:
    """``value`` as a non-negative int, or ConfigError naming ``scheme.<key>``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"scheme.{key}", f"must be a whole number >= 0, got {value!r}")
    return int(value)


@register("finetune")
class FineTune(FedAvg):
    """FedAvg; each institution is scored after fine-tuning the merged model on its own data."""

    adapt_steps: int = 0
    adapt_epochs: int = 0

    # 20 steps: about one epoch of the default scenario's mid-sized shards (~30 batches of 32)
    # and a third of the largest, so a merged model adapts without forgetting what it shares.
    def __init__(self, *, finetune_steps: int = 20, finetune_epochs: int = 0, **fedavg):
        super().__init__(**fedavg)
        self.adapt_steps = check_count("finetune_steps", finetune_steps)
        self.adapt_epochs = check_count("finetune_epochs", finetune_epochs)

    def plan(self, round: int) -> LocalPlan:
        """FedAvg's local step; scoring adapts a copy of the merged model first, drawing from this round's stream."""
        return LocalPlan(client=AdaptClient(self.adapt_steps, self.adapt_epochs, round))


ADAPT_STREAM = 0xADA97
"""Fourth element of the RNG key of adaptation before scoring (finetune, reptile)."""


@dataclass(frozen=True)
class AdaptClient(Client):
    """The client half of schemes scored after local adaptation: FedAvg's step; before scoring, a copy of the merged
    model is fine-tuned on the own training data (finetune; reptile's adaptation steps)."""

    steps: int = 0  # minibatch SGD steps before scoring
    epochs: int = 0  # whole local epochs instead; wins over steps when > 0
    round: int = 0  # the planned round: seeds adaptation's RNG (scoring is not told the round)

    @property
    def adapts(self) -> bool:  # type: ignore[override]
        """Whether scoring adapts at all (0 steps and 0 epochs score the merged model as it is)."""
        return self.steps > 0 or self.epochs > 0

    def adapt(self, inst: Any, model: torch.nn.Module) -> None:
        """Fine-tune the lent model on the own training data; what the institution carries is untouched."""
        x, y, n = inst.shard.x_train, inst.shard.y_train, inst.shard.num_train
        if n == 0 or not self.adapts:
            return
        key = (inst.seed, inst.spec.index, self.round, ADAPT_STREAM)
        training = replace(inst.training, local_epochs=self.epochs)
        if self.epochs <= 0:
            # Exactly ``steps`` minibatches: that many batches' worth of fresh permutations,
            # trained as one epoch (a shard smaller than a batch is one batch per step, as in training).
            size = min(max(1, inst.training.batch_size), n)
            rng, _ = rng_for((*key, 0))
            need = self.steps * size
            idx = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
            x, y = x[idx], y[idx]
            training = replace(inst.training, local_epochs=1, batch_size=size)
        local_train(model, x, y, training=training, key=key)
