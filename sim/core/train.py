"""Local training, full-shard gradients and evaluation: pure torch, no Ray.

Institutions and the coordinator's central trainer both call these. Arrays come in as
numpy (float inputs, int64 labels) and results go out as numpy/floats. Batches follow
the model: they are moved to ``next(model.parameters())``'s device and floating dtype,
so a model the caller put on a GPU trains there.

Determinism: every random draw (shuffling, dropout) comes from :func:`rng_for(key)`,
and torch's global RNG is forked around training, so the same model, data, plan and key
give identical weights (with ``torch.set_num_threads`` fixed by the caller) and callers'
RNG state is left alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sim.core import dp_sgd
from sim.core.objective import Term
from sim.core.types import TrainingSpec

_CHUNK = 4096  # samples per forward pass when a whole shard is processed at once (bounds memory)


def lr_scale(schedule: str, round: int, training: TrainingSpec) -> float:
    """Factor on a base learning rate in (1-based) ``round``: 1 in round 1, then per ``schedule``.

    ``constant``: 1. ``cosine``: 0.5 * (1 + cos(pi * (round - 1) / rounds)), from 1 down towards
    0 over the run's planned rounds (never 0 in a round that trains). ``step``: step_gamma **
    floor((round - 1) / step_every).
    """
    if schedule == "constant" or round < 1:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (round - 1) / training.rounds)) if training.rounds > 0 else 1.0
    if schedule == "step":
        return float(training.step_gamma) ** ((round - 1) // training.step_every)
    raise ValueError(f"unknown schedule {schedule!r}")


def scheduled(training: TrainingSpec, round: int) -> TrainingSpec:
    """The local-training settings of ``round``: learning rates (and a head's own) scaled by ``training.schedule``."""
    f = lr_scale(training.schedule, round, training)
    if f == 1.0:
        return training
    return replace(training, lr=training.lr * f, head_lr=None if training.head_lr is None else training.head_lr * f)


def rng_for(key: tuple[int, ...]) -> tuple[np.random.Generator, torch.Generator]:
    """Independent numpy and torch generators, both seeded from ``np.random.SeedSequence(key)`` (non-negative ints)."""
    np_seq, torch_seq = np.random.SeedSequence([int(k) for k in key]).spawn(2)
    torch_seed = int(torch_seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))  # 63 bits: fits manual_seed
    return np.random.default_rng(np_seq), torch.Generator().manual_seed(torch_seed)


def numpy_rng_for(key: tuple[int, ...]) -> np.random.Generator:
    """The numpy generator of :func:`rng_for` alone (the same stream), without making the torch one."""
    # SeedSequence(key).spawn(1)[0], made directly (a third faster: one generator per institution and round)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key], spawn_key=(0,))))


def deterministic_cuda() -> None:
    """Make this process's CUDA kernels repeat bit for bit: the determinism contract holds on GPU hosts too.

    Deterministic algorithms (atomics in scatter/index_add reorder sums otherwise), cuBLAS's fixed workspace
    (read when its handle is made, at the first matrix product), and attention on PyTorch's math kernel: the
    flash, memory-efficient and cuDNN kernels' backward passes are not deterministic, and with ``warn_only`` the
    switch above only warns about them. Costs speed on a GPU; CPU hosts never call it (the switch imports torch's
    compiler stack, ~2 s a process).
    """
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    for kernel in ("flash", "mem_efficient", "cudnn"):
        getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(False)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in what floating dtype the model's parameters live."""
    p = next(model.parameters())
    return p.device, (p.dtype if p.is_floating_point() else torch.float32)


def _to_tensors(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in the model's dtype and labels as int64, both on the model's device."""
    device, dtype = _device_dtype(model)
    xt = torch.as_tensor(np.asarray(x))
    if xt.is_floating_point():
        xt = xt.to(dtype)
    return xt.to(device), torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device)


@functools.cache
def native_bf16() -> bool:
    """Whether this machine's CPU does bf16 arithmetic natively (Linux's CPU flags; False where they cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 forward passes; fp32, and fp16 off a GPU (warned once), run untouched in fp32.

    bf16 on a CPU without native bf16 runs, with a warning (once per process): it is slower than fp32 there.

    fp16 needs a GPU (its loss scaling is CUDA's), but where an actor runs is only known
    there, so a CPU host falls back to fp32 instead of failing the run.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("training.precision=fp16 needs a GPU; training in fp32 on CPU", RuntimeWarning, stacklevel=3)
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cpu" and not native_bf16():
        warnings.warn("training.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): expect it slower than "
                      "fp32 (MiniLM+LoRA: 1.1 against 38 samples/s on one such CPU)", RuntimeWarning, stacklevel=3)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _widened(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (from autocast) as float32 for the loss; fp32 and fp64 ones untouched."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _minibatches(rng: np.random.Generator, n: int, training: TrainingSpec) -> list[np.ndarray]:
    """Index arrays of every minibatch of every local epoch, each epoch freshly shuffled."""
    size = max(1, int(training.batch_size))
    batches = []
    for _ in range(training.local_epochs):
        perm = rng.permutation(n)
        batches += [perm[i : i + size] for i in range(0, n, size)]
    return batches


def optimizer(model: nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    """A fresh SGD or AdamW over the model's trainable parameters; a transformer's head (``model.head_keys``) at
    ``training.head_lr`` when set. What every local step and the data-parallel pooled step train with."""
    trainable: list = [p for p in model.parameters() if p.requires_grad]
    head = getattr(model, "head_keys", frozenset())
    if training.head_lr is not None and head:  # a fresh head learns faster than pretrained weights may move
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        trainable = [{"params": [p for n, p in named if n not in head]},
                     {"params": [p for n, p in named if n in head], "lr": training.head_lr}]
    if training.optimizer == "adamw":  # what LoRA fine-tuning uses in practice; momentum does not apply
        return torch.optim.AdamW(trainable, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(trainable, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)


def local_train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    training: TrainingSpec,
    key: tuple[int, ...],
    terms: Sequence[Term] = (),
    dp: dp_sgd.DpSgd | None = None,
    max_steps: int | None = None,
) -> tuple[float, int]:
    """Train ``model`` in place with SGD on (x, y); return (mean per-sample training loss, optimizer steps).

    ``training.local_epochs`` passes of shuffled minibatches with cross-entropy, plus each of
    ``terms`` (:mod:`sim.core.objective`: a scheme's proximal pull, its gradient correction), added
    in order. The reported loss is the data loss only (no extra term), so schemes compare.
    With ``max_steps`` only the first that many minibatches are trained (a straggler's partial
    work, :mod:`sim.core.stragglers`): the same draws as a full step, cut short.
    With ``dp`` the steps are DP-SGD's (:mod:`sim.core.dp_sgd`, Opacus): Poisson-sampled batches from the stream
    ``(*key, dp_sgd.SAMPLING_STREAM)`` instead of shuffled ones, per-sample clipping and Gaussian noise from
    ``(*key, dp_sgd.NOISE_STREAM)``, in fp32; the extra terms touch no data and are added unclipped.

    A fresh optimizer is built every call: momentum does not carry across rounds
    (institutions restart from a merged state that momentum buffers would not match).
    """
    n = len(y)
    if n == 0:
        return float("nan"), 0
    np_rng, gen = rng_for(key)
    xt, yt = _to_tensors(model, x, y)
    device, dtype = _device_dtype(model)
    params = dict(model.named_parameters())
    extra = [b for t in terms if (b := t.bind(params, device, dtype)) is not None]
    opt = optimizer(model, training)
    if dp is not None:  # Poisson samples of the shard, as the accountant counts them
        batches = dp_sgd.poisson_batches(n, training.batch_size, training.local_epochs,
                                         rng_for((*key, dp_sgd.SAMPLING_STREAM))[1])[:max_steps]
    else:
        batches = _minibatches(np_rng, n, training)[:max_steps]
    if not batches:  # local_epochs == 0
        return float("nan"), 0
    dropout_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    amp = training.precision
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda" and dp is None)
    private = contextlib.nullcontext(opt)
    if dp is not None:  # the optimizer becomes Opacus's DPOptimizer while the model carries its hooks
        noise_gen = dp_sgd.noise_generator(rng_for((*key, dp_sgd.NOISE_STREAM))[1], device)
        private = dp_sgd.private(model, opt, dp, min(max(1, int(training.batch_size)), n), noise_gen)

    was_training = model.training
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on-device: no GPU sync per step
    seen = 0
    # Dropout and friends draw from torch's global RNG: fork it (CPU, and the model's GPU
    # if any) and seed it from the key, so callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), private as opt:
        torch.manual_seed(dropout_seed)
        for idx in batches:
            index = torch.as_tensor(idx).to(device)
            xb, yb = xt.index_select(0, index), yt.index_select(0, index)
            opt.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                logits = model(xb)
            data_loss = F.cross_entropy(_widened(logits), yb)
            loss = data_loss if dp is None else torch.zeros((), device=device)  # DP: only the extra terms
            for term in extra:  # a proximal pull, a linear correction (whose gradient is the correction itself)
                loss = loss + term(params)
            if dp is not None:
                dp_sgd.step(opt, data_loss, loss)
            else:
                if loss.requires_grad:
                    scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            if len(idx):  # an empty Poisson batch still steps (pure noise) but has no loss
                loss_sum += data_loss.detach().double() * len(idx)
                seen += len(idx)
    model.train(was_training)
    return float(loss_sum) / seen if seen else float("nan"), len(batches)


def full_gradient(model: nn.Module, x: np.ndarray, y: np.ndarray, precision: str = "fp32") -> tuple[dict[str, np.ndarray], float]:
    """Gradient of the mean cross-entropy over the whole shard (FedSGD) and that loss; named like ``get_state``.

    Only parameters that require grad are included. The shard is processed in chunks
    to bound memory; the model is left in its mode with no ``.grad`` attached.
    ``precision`` autocasts the forward passes like ``training.precision`` does in
    :func:`local_train` (without loss scaling: one summed gradient, no optimizer step).
    """
    n = len(y)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if n == 0:
        return {k: np.zeros(tuple(p.shape), np.float32) for k, p in trainable.items()}, float("nan")
    xt, yt = _to_tensors(model, x, y)
    was_training = model.training
    model.train()  # the gradient a training step would see
    for p in trainable.values():
        p.grad = None
    total = 0.0
    for start in range(0, n, _CHUNK):
        with _autocast(xt.device, precision):
            logits = model(xt[start : start + _CHUNK])
        loss = F.cross_entropy(_widened(logits), yt[start : start + _CHUNK], reduction="sum") / n
        loss.backward()
        total += float(loss.detach())
    grads = {k: p.grad.detach().cpu().float().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32) for k, p in trainable.items()}
    for p in trainable.values():
        p.grad = None
    model.train(was_training)
    return grads, total


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on (x, y), without gradients; NaNs for an empty set.

    ``precision`` autocasts the forward passes like ``training.precision`` in :func:`local_train`.
    """
    n = len(y)
    if n == 0:
        return float("nan"), float("nan")
    xt, yt = _to_tensors(model, x, y)
    was_training = model.training
    model.eval()
    size = max(1, int(batch_size))
    correct, loss_sum = 0, 0.0
    with torch.inference_mode():  # no autograd bookkeeping at all (cheaper than no_grad)
        for start in range(0, n, size):
            with _autocast(xt.device, precision):
                logits = _widened(model(xt[start : start + size]))
            yb = yt[start : start + size]
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    model.train(was_training)
    return correct / n, loss_sum / n


