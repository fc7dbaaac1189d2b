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

from agents.schemes.base import register
from agents.schemes.fedavg import FedAvg
from sim.core.types import ConfigError, LocalPlan


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
        return LocalPlan(adapt_steps=self.adapt_steps, adapt_epochs=self.adapt_epochs, adapt_round=round)
