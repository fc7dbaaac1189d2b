"""Sample-level DP-SGD for one institution's local step, with Opacus. Pure torch, no Ray.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, as Opacus implements it:
each step's batch is a Poisson sample of the shard (every sample joins independently with
probability ``q = batch_size / n``, so batches vary in size and may be empty), Opacus's
:class:`~opacus.GradSampleModule` computes each sample's gradient, its
:class:`~opacus.optimizers.DPOptimizer` clips each to L2 norm ``clip_norm`` (all trainable
parameters as one vector), adds Gaussian noise of std ``noise_multiplier * clip_norm`` to the
sum and divides by the *expected* batch size ``q * n`` (so one sample moves a step by at most
``clip_norm / (q n)`` whatever the batch drawn). Both the sampling and the noise come from
torch generators seeded from the institution's stream, so a run repeats bit for bit
(``secure_mode=False``: a secure run wants a cryptographic generator, which cannot be replayed).

Accounting (by the institution with dp-accounting's RDP accountant,
:func:`agents.schemes.privacy.epsilon`): ``steps`` compositions of the Poisson-subsampled
Gaussian mechanism at rate ``q``, which is exactly what the steps are.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

# Opacus is imported where it is used: importing it takes seconds (scipy.stats, torch.distributed.tensor),
# which every actor and test would pay through sim.core.train although only private institutions need it.

NOISE_STREAM = 0xD95D
"""Last element of the RNG key of DP-SGD's noise, apart from sampling and dropout."""
SAMPLING_STREAM = 0xD95A
"""Last element of the RNG key of DP-SGD's Poisson sampling."""


@dataclass(frozen=True)
class DpSgd:
    """What a DP-SGD local step needs: the noise multiplier and each sample's clipping norm."""

    noise_multiplier: float
    clip_norm: float


def schedule(n: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sampling rate q, steps) of one round's local training on ``n`` samples: what the accountant composes.

    ``q = batch_size / n`` (1 when the batch covers the shard) and ``local_epochs * ceil(n / batch_size)`` steps,
    so a round still sees each sample ``local_epochs`` times in expectation.
    """
    size = min(max(1, batch_size), n)
    return size / n, local_epochs * math.ceil(n / size)


def poisson_batches(n: int, batch_size: int, local_epochs: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index tensors of a round's steps, each a Poisson sample of ``range(n)`` at rate q (Opacus's sampler, seeded)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    q, steps = schedule(n, batch_size, local_epochs)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=generator, steps=steps)
    return [torch.tensor(idx, dtype=torch.int64) for idx in sampler]


def unsupported(model: nn.Module) -> str | None:
    """Why Opacus cannot compute per-sample gradients of ``model`` (e.g. BatchNorm mixes samples); None if it can.

    The first sentence of Opacus's validator's first complaint.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    return None if not errors else str(errors[0]).strip().split(". ")[0].rstrip(".")


def noise_generator(key_generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` (where Opacus draws the noise) seeded like ``key_generator``."""
    return torch.Generator(device).manual_seed(key_generator.initial_seed())


@contextmanager
def private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DpSgd, expected_batch: int,
            generator: torch.Generator) -> Iterator["DPOptimizer"]:
    """``optimizer`` as Opacus's DPOptimizer over ``model`` with per-sample gradient hooks; the hooks go on exit.

    The model is hooked in place (not replaced), so the caller keeps calling it as before;
    the noise is drawn with ``generator``, which must live on the model's device.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    hooked = GradSampleModule(model, loss_reduction="mean", strict=True)
    try:
        yield DPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                          expected_batch_size=expected_batch, loss_reduction="mean", generator=generator,
                          secure_mode=False)
    finally:
        hooked.to_standard_module()  # removes the hooks and most attributes Opacus put on the parameters
        for p in model.parameters():
            if hasattr(p, "summed_grad"):  # DPOptimizer's, which that leaves
                del p.summed_grad
        for module in model.modules():
            for attr in ("activations", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)


def step(optimizer: "DPOptimizer", data_loss: torch.Tensor, extra: torch.Tensor) -> None:
    """One DP-SGD step after a forward pass: the data gradient clipped per sample and noised, ``extra``'s added unclipped.

    ``extra`` holds terms that touch no data (FedProx's proximal pull, SCAFFOLD's correction):
    they are backpropagated after Opacus has written the private gradient, so they add to it.
    """
    with warnings.catch_warnings():  # the first layer's input needs no gradient: torch says so, Opacus expects it
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        data_loss.backward()  # fills each parameter's grad_sample (an empty batch gives empty ones: pure noise)
    optimizer.pre_step()  # clip, sum, noise, divide by the expected batch: .grad is now private
    if extra.requires_grad:
        extra.backward()
    optimizer.original_optimizer.step()
