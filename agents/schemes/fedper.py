"""FedPer: federated base layers, personal heads.

Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
Layers", arXiv:1912.00818, 2019. Institutions share the body of the model (for a
pretrained transformer: its adapters) through FedAvg and keep their head at home. Each
round an institution starts from the merged body and its own head, trains both, uploads
only the body, and is scored as that personal model (merged body + own head). Nobody
uploads a head, so the global state keeps the head it started with.
"""

from __future__ import annotations

from typing import Sequence

from agents.schemes.base import register
from agents.schemes.fedavg import FedAvg
from sim.core.types import ConfigError, LocalPlan

AUTO = "auto"
"""``personal_keys`` value meaning: the keys of the model's last layer (its head)."""


def check_personal_keys(value: str | Sequence[str] | None) -> tuple[str, ...] | str:
    """``auto`` (or None) or a non-empty list of non-empty key prefixes; ConfigError naming scheme.personal_keys otherwise."""
    if value is None or value == AUTO:
        return AUTO
    fix = "use auto (the model's last layer) or a list of state-key prefixes, e.g. [3.] for an MLP's head"
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
        raise ConfigError("scheme.personal_keys", f"got {value!r}; {fix}")
    prefixes = tuple(value)
    if not all(isinstance(p, str) and p for p in prefixes):
        raise ConfigError("scheme.personal_keys", f"prefixes must be non-empty strings, got {list(prefixes)!r}; {fix}")
    return prefixes


@register("fedper")
class FedPer(FedAvg):
    """FedAvg over everything but the personal keys; each institution keeps and is scored with its own head."""

    # None reads as auto: the config check types keys by their defaults, and this one takes a word or a list.
    def __init__(self, *, personal_keys: str | Sequence[str] | None = None, **fedavg):
        super().__init__(**fedavg)
        self.personal_keys = check_personal_keys(personal_keys)

    def plan(self, round: int) -> LocalPlan:
        """Start from the merged body + own head, upload the body only, score the personal model."""
        return LocalPlan(personal_keys=self.personal_keys, evaluate="personal")
