"""Knowledge distillation on an unlabeled public set: the two steps feddf and fedmd are made of.

Pure functions over a torch model and numpy arrays, scheme-agnostic like :mod:`sim.core.train`:
:func:`logits` scores a model on the public inputs (what an ensemble averages, what FedMD's
institutions send), :func:`distil` trains a model towards given logits. No label is ever
read: the targets are other models' outputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sim.core.train import _device_dtype, rng_for

LOSSES = ("kl", "mae")
"""kl: Hinton et al.'s softened KL divergence (FedDF); mae: mean absolute error on the logits (FedMD's own code)."""


def _inputs(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    """Inputs in the model's dtype (token ids stay integers), on its device."""
    device, dtype = _device_dtype(model)
    xt = torch.as_tensor(np.asarray(x))
    return (xt.to(dtype) if xt.is_floating_point() else xt).to(device)


def logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The model's class scores (logits, float32) on ``x``, in eval mode and without gradients."""
    xt = _inputs(model, x)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        out = [model(xt[i : i + batch_size]).float().cpu() for i in range(0, len(xt), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def distil(model: nn.Module, x: np.ndarray, targets: np.ndarray, *, steps: int, batch_size: int, lr: float,
           key: tuple[int, ...], temperature: float = 1.0, loss: str = "kl") -> tuple[float, int]:
    """Train ``model`` in place towards ``targets`` (logits on ``x``) with Adam for ``steps`` minibatches drawn from
    the stream ``key``; return (mean distillation loss, steps). A fresh optimizer every call."""
    n = len(x)
    if n == 0 or steps <= 0:
        return math.nan, 0
    rng, gen = rng_for(key)
    xt = _inputs(model, x)
    tt = torch.as_tensor(np.asarray(targets, np.float32)).to(xt.device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    size = min(max(1, int(batch_size)), n)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * size // n))])
    was_training = model.training
    model.train()
    total = 0.0
    with torch.random.fork_rng(devices=[xt.device] if xt.device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # dropout, if any: from the key
        total = _steps(model, opt, xt, tt, order, steps, size, temperature, loss)
    model.train(was_training)
    return total / steps, steps


def _steps(model: nn.Module, opt: torch.optim.Optimizer, xt: torch.Tensor, tt: torch.Tensor, order: np.ndarray,
           steps: int, size: int, temperature: float, loss: str) -> float:
    """The distillation steps of :func:`distil`; their summed loss."""
    total = 0.0
    for s in range(steps):
        idx = torch.as_tensor(order[s * size : (s + 1) * size]).to(xt.device)
        student, teacher = model(xt.index_select(0, idx)).float(), tt.index_select(0, idx)
        if loss == "mae":
            value = (student - teacher).abs().mean()
        else:  # KL(teacher || student) on softened outputs, times T^2 so gradients keep their scale (Hinton et al.)
            t = float(temperature)
            value = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                             reduction="batchmean", log_target=True) * t * t
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        total += float(value.detach())
    return total
