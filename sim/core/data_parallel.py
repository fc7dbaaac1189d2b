"""One round of data-parallel training on one worker: pure torch (and torch.distributed), no Ray.

:mod:`agents.runtime.ray_train` runs this on each Ray Train worker. The batch mapping makes
DDP's step equal to the central trainer's step on the same global batch:

The central trainer takes ``S = ceil(N / batch_size)`` steps per epoch over the N pooled
rows. Each worker shuffles its own ``n_i`` rows every epoch and deals them into the same
S chunks (``np.array_split``), so step j's global batch holds about ``n_i / S`` rows of
every institution and ``N / S <= batch_size`` rows in all. Each worker's summed loss is
scaled by ``k / N_j`` (k workers, N_j rows in step j over all workers), so DDP's mean
over workers is the mean over the global batch, with the same learning rate.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sim.core.train import _autocast, _widened, optimizer, rng_for
from sim.core.types import TrainingSpec


def steps_per_epoch(total: int, batch_size: int) -> int:
    """S: the central trainer's optimizer steps per epoch over ``total`` pooled rows (at least one)."""
    return max(1, math.ceil(total / max(1, int(batch_size))))


def step_rows(sizes: Sequence[int], steps: int) -> np.ndarray:
    """Rows in each step's global batch: a worker with n rows gives n // S, one more in its first n % S steps
    (how ``np.array_split`` deals n rows into S chunks)."""
    j = np.arange(steps)
    return np.sum([n // steps + (j < n % steps) for n in sizes], axis=0).astype(np.int64)


def train_round(ddp: Any, model: Any, x: Any, y: Any, *, sizes: Sequence[int], rank: int, index: int,
                training: TrainingSpec, key: tuple[int, ...]) -> float:
    """``training.local_epochs`` epochs of data-parallel SGD on this worker's shard; the pool's mean training loss.

    Step j's loss is this worker's summed cross-entropy times k / N_j, so DDP's mean over the k
    workers is the mean over the step's global batch. A worker with no rows in a step still takes
    part (a zero-weight row), since every rank must join every gradient all-reduce.
    """
    k, n = len(sizes), sizes[rank]
    steps = steps_per_epoch(sum(sizes), training.batch_size)
    rows = step_rows(sizes, steps)
    np_rng, gen = rng_for((*key, index))  # the institution's own stream: the same whichever rank it gets
    device = x.device
    opt = optimizer(model, training)
    scaler = torch.amp.GradScaler(device.type, enabled=training.precision == "fp16" and device.type == "cuda")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    ddp.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # dropout, seeded as local_train seeds it
        for _ in range(training.local_epochs):
            for j, idx in enumerate(np.array_split(np_rng.permutation(n), steps)):
                take = torch.from_numpy(idx if len(idx) else np.zeros(1, np.int64)).to(device)
                opt.zero_grad(set_to_none=True)
                with _autocast(device, training.precision):
                    logits = ddp(x.index_select(0, take))
                data_loss = F.cross_entropy(_widened(logits), y.index_select(0, take), reduction="sum")
                weight = k / float(rows[j]) if len(idx) else 0.0
                scaler.scale(data_loss * weight).backward()
                scaler.step(opt)
                scaler.update()
                if len(idx):
                    loss_sum += data_loss.detach().double()
                    seen += len(idx)
    total = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if float(total[1]) else math.nan
