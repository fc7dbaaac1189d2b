"""Extra terms of a local objective: what a scheme adds to the data loss, scheme-agnostic and pure.

A scheme's client half (agents/schemes/) says which terms its institutions' local steps minimise besides
the cross-entropy; the trainer (:func:`sim.core.train.local_train`) adds each term's value to the loss
it differentiates, and the vectorised trainer (:mod:`sim.core.batched`) batches :class:`Pull` across
institutions. FedProx's proximal term and Ditto's personal pull are a :class:`Pull`; SCAFFOLD's
gradient correction c - c_i is a :class:`Shift`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from sim.core.types import State

Bound = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
"""A term made ready for one model: the model's named parameters -> the term's value (a scalar tensor)."""


@dataclass(frozen=True)
class Pull:
    """(mu/2) * ||w - anchor||^2 over the parameters ``anchor`` names; no anchor: the weights training starts from."""

    mu: float
    anchor: State | None = field(default=None, compare=False, repr=False)

    def bind(self, params: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Bound | None:
        """The term over ``params`` (anchors copied to their device and dtype now); None when it adds nothing."""
        if self.mu <= 0:
            return None
        source = self.anchor if self.anchor is not None else {k: p.detach() for k, p in params.items()}
        pull = {k: torch.as_tensor(np.asarray(v)).to(device=device, dtype=dtype).clone() for k, v in source.items()
                if k in params}
        if not pull:
            return None
        mu = self.mu
        return lambda p: 0.5 * mu * sum(((p[k] - a) ** 2).sum() for k, a in pull.items())


@dataclass(frozen=True)
class Shift:
    """<w, c> over the parameters ``c`` names: a linear term, so each gradient step follows g + c."""

    c: State = field(compare=False, repr=False)

    def bind(self, params: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Bound | None:
        """The term over ``params``; None when ``c`` names none of them."""
        shift = {k: torch.as_tensor(np.asarray(v)).to(device=device, dtype=dtype) for k, v in self.c.items()
                 if k in params}
        if not shift:
            return None
        return lambda p: sum((p[k] * c).sum() for k, c in shift.items())


Term = Pull | Shift
"""The terms a local objective may add."""
