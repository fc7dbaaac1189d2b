"""Sample-level DP-SGD for one institution's local step: per-sample gradients, clipped and noised. Pure torch, no Ray.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016. Each sample's gradient
(over the trainable parameters, as one vector) is clipped to L2 norm ``clip_norm``; the
clipped gradients are summed, Gaussian noise of std ``noise_multiplier * clip_norm`` is
added, and the sum is divided by the *expected* batch size (a fixed denominator, so one
sample moves a step by at most ``clip_norm / batch``). Per-sample gradients come from
``torch.func`` (``vmap`` over ``grad``), which is what Opacus's functorch hooks do too,
without wrapping the model or the optimizer; the noise comes from a torch generator the
caller seeds (drawn on the CPU, so every device sees the same numbers).

Accounting (done by the institution with dp-accounting's RDP accountant,
:func:`agents.schemes.privacy.epsilon`): ``steps`` compositions of a Poisson-subsampled
Gaussian at rate ``batch / n``. The batches are fixed-size slices of a shuffle, not Poisson
samples; treating them as Poisson at the same rate is the usual approximation (TF Privacy's
``compute_dp_sgd_privacy``, Opacus without Poisson sampling), not a formal guarantee for shuffling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

NOISE_STREAM = 0xD95D
"""Last element of the RNG key of DP-SGD's noise, apart from shuffling and dropout."""


@dataclass(frozen=True)
class DpSgd:
    """What a DP-SGD local step needs: the noise multiplier and each sample's clipping norm."""

    noise_multiplier: float
    clip_norm: float


def schedule(n: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sampling rate, steps) of one round's local training on ``n`` samples: what the accountant composes."""
    size = min(max(1, batch_size), n)
    return size / n, local_epochs * math.ceil(n / size)


def per_sample_grads(model: nn.Module, x: torch.Tensor,
                     y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each sample's cross-entropy over the trainable parameters (leading batch axis), and the losses."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    rest = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad} | dict(model.named_buffers())

    def loss(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, ps | rest, (xi.unsqueeze(0),))
        value = F.cross_entropy(logits.float(), yi.unsqueeze(0))
        return value, value.detach()

    # randomness="different": each sample its own dropout mask, drawn from the (forked, seeded) global RNG
    grads, losses = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    return grads, losses


def clip(grads: dict[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """Each sample's gradient scaled by ``min(1, clip_norm / ||g||)`` (all parameters as one vector), still per sample."""
    norms = torch.sqrt(sum(g.flatten(1).double().pow(2).sum(1) for g in grads.values()))
    scale = (clip_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's guard: a zero gradient stays zero
    return {k: g * scale.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


def noisy_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dp: DpSgd, expected_batch: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Write (sum of clipped per-sample gradients + N(0, (z C)^2)) / expected_batch into ``.grad``; return the mean loss."""
    grads, losses = per_sample_grads(model, x, y)
    clipped = clip(grads, dp.clip_norm)
    std = dp.noise_multiplier * dp.clip_norm
    params = dict(model.named_parameters())
    for k, g in clipped.items():
        noise = torch.randn(tuple(g.shape[1:]), generator=generator, dtype=torch.float64) * std
        total = g.sum(0).double() + noise.to(g.device)
        params[k].grad = (total / expected_batch).to(params[k].dtype)
    return losses.mean()
