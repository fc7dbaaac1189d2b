"""FedPer: federated base layers, personal heads.

Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
Layers", arXiv:1912.00818, 2019. Institutions share the body of the model (for a
pretrained transformer: its adapters) through FedAvg and keep their head at home. Each
round an institution starts from the merged body and its own head, trains both, uploads
only the body, and is scored as that personal model (merged body + own head). Nobody
uploads a head, so the global state keeps the head it started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from agents.schemes.base import Client, Work, register
from agents.schemes.fedavg import FedAvg
from sim.core.types import ConfigError, LocalPlan, State, TrainingSpec

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
        return LocalPlan(evaluate="personal", client=FedPerClient(self.personal_keys))


HEAD_NAMES = ("classifier", "score", "head")
"""Module names transformers give a classification head; ``auto`` keeps all of such a head, not just its last layer."""


def personal_keys(prefixes: tuple[str, ...] | str, state: State) -> tuple[str, ...]:
    """State keys an institution keeps to itself: those under ``prefixes``, or with "auto" the head's."""
    names = list(state)
    if not prefixes or not names:
        return ()
    if prefixes == AUTO:
        # state_dict order runs module by module, so the last floating key belongs to the last
        # layer with parameters: an MLP's output Linear, a transformer's classifier.
        last = next((k for k in reversed(names) if np.issubdtype(np.asarray(state[k]).dtype, np.floating)), names[-1])
        parts = last.split(".")[:-1]
        cut = next((i + 1 for i, p in enumerate(parts) if p in HEAD_NAMES), len(parts))
        module = ".".join(parts[:cut])
        if not module:  # parameters of the root module itself: all of them are its "last layer"
            return tuple(k for k in names if "." not in k)
        return tuple(k for k in names if k.startswith(module + "."))
    keys = tuple(k for k in names if k.startswith(tuple(prefixes)))
    if not keys:
        raise ConfigError("scheme.personal_keys", f"{list(prefixes)} match no key of the model state "
                          f"(keys look like {names[0]!r}); use auto or prefixes of those keys")
    return keys


@dataclass(frozen=True)
class FedPerClient(Client):
    """FedPer's client half: start from the merged body and the own head, keep the head at home, score both."""

    batchable = False  # its head stays home: the institution's own step handles that
    whole = False  # no key of the head is sent or merged

    prefixes: tuple[str, ...] | str = AUTO  # key prefixes kept local; "auto" = the model's last layer

    def kept(self, global_state: State) -> tuple[str, ...]:
        """The head's keys."""
        return personal_keys(self.prefixes, global_state)

    def with_head(self, inst: Any, global_state: State | None) -> State | None:
        """The merged shared part with the institution's own head; None without a global model or a head."""
        kept = self.kept(global_state) if global_state else ()
        return {**global_state, **{k: inst.personal[k] for k in kept}} if kept else None

    def start(self, inst: Any, plan: LocalPlan, global_state: State | None) -> State | None:
        """The shared part from the global model, the head its own."""
        return self.with_head(inst, global_state) or super().start(inst, plan, global_state)

    def after(self, inst: Any, model: Any, plan: LocalPlan, global_state: State | None, work: Work, round: int,
              training: TrainingSpec) -> None:
        """The trained head stays home (never uploaded) as the institution's own."""
        kept = self.kept(global_state) if global_state else ()
        if kept:
            inst.personal, inst.changed = {k: work.payload.pop(k) for k in kept}, True
        else:
            super().after(inst, model, plan, global_state, work, round, training)

    def scored(self, inst: Any, plan: LocalPlan, global_state: State | None) -> State | None:
        """The merged shared part with its own head."""
        merged = self.with_head(inst, global_state) if plan.evaluate == "personal" else None
        return merged or super().scored(inst, plan, global_state)
