"""Pooled training as real data-parallel training on Ray Train: one worker per contributing institution.

The ``pooled`` scheme (:mod:`agents.schemes.pooled`) trains on the data its partners
handed over. On the Ray backend that training can run where the partners' compute is:
a Ray Train job (``TorchTrainer`` + ``ScalingConfig``) with one worker per contributing
institution, each holding that institution's shard (the pool's natural partition) and
averaging gradients with PyTorch DDP every step (gloo on CPU, nccl when every worker
has a whole GPU), so "pool the data and the compute" is simulated with the compute the
partners bring (Li et al., "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training", VLDB 2020).

Batches: the same steps, global batch and learning rate as the central trainer
(:mod:`sim.core.data_parallel` says how).

One job serves a whole run: it starts at the first pooled round and its workers wait
between rounds for the next job from a small mailbox actor, so Ray Train's start-up
(controller, worker processes, process group) is paid once per run, not per round.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from agents.schemes.pooled import AUTO, CENTRAL, RAY_TRAIN, TRAINERS
from sim.core.types import ConfigError, InstitutionSpec, State, TrainingSpec

log = logging.getLogger("collabsim")
MIN_WORKER_CPUS = 0.01  # a Ray bundle must ask for something: institutions that declare no compute get this much


@dataclass(frozen=True)
class WorkerPlan:
    """What the data-parallel job reserves: up to ``workers`` Ray Train workers, each with the same request
    (Ray Train gives every worker the same bundle)."""

    workers: int
    cpus: float  # per worker: the institutions' mean, so the job holds what they declared in all
    gpus: float  # per worker: their mean GPUs when the cluster has GPUs, else 0


def resolve(scheme: Mapping[str, Any], backend: str) -> str:
    """``central`` or ``ray_train`` as ``scheme.trainer`` asks on ``backend``; ConfigError for ray_train off Ray."""
    # Schemes without the key train nothing centrally; a pooled config from before the key keeps its central numbers.
    choice = scheme.get("trainer", CENTRAL)
    if choice not in TRAINERS:
        raise ConfigError("scheme.trainer", f"expected one of {', '.join(TRAINERS)}, got {choice!r}")
    if choice == RAY_TRAIN and backend != "ray":
        raise ConfigError("scheme.trainer", "ray_train runs on Ray Train workers; set engine.backend=ray, "
                          "or scheme.trainer=auto (central in-process)")
    return CENTRAL if choice == AUTO and backend != "ray" else choice


def worker_plan(spec: Any, specs: Sequence[InstitutionSpec], cpus: float, gpus: float, room: float) -> WorkerPlan | None:
    """The job's reservation for a run (a :class:`~sim.core.config.RunSpec`) on a cluster of ``cpus``/``gpus``, or None
    when it trains centrally. ``room``: CPUs left beside the coordinator, which the workers and the hosts share.

    ``auto`` takes Ray Train when the run joins a cluster (``cluster.address`` set) and trains
    centrally on a local one: a choice the config makes, not the machine's size, so the same
    config gives the same numbers wherever it runs (a laptop's cores could not keep one worker per
    institution busy anyway). ``ray_train`` (asked for, or ``auto`` on a cluster) that does not fit is refused.
    """
    choice = resolve(spec.scheme, spec.engine.backend)
    if choice == AUTO:
        choice = RAY_TRAIN if (spec.cluster or {}).get("address") else CENTRAL
    if choice == CENTRAL or not specs:
        return None
    n = len(specs)
    per_gpu = sum(s.gpus for s in specs) / n if gpus > 0 else 0.0
    per_gpu = float(math.floor(per_gpu)) if per_gpu > 1 else per_gpu  # Ray: above one GPU only whole ones
    per_cpu = sum(s.cpus for s in specs) / n
    per_cpu = max(per_cpu, MIN_WORKER_CPUS) if per_gpu == 0 else per_cpu
    fits = n * per_cpu < room - 1e-9 and n * per_gpu <= gpus + 1e-9
    if not fits:
        raise ConfigError("scheme.trainer", f"ray_train's {n} workers ask for {n * per_cpu:g} CPUs and {n * per_gpu:g} "
                          f"GPUs (the institutions' cpus/gpus) beside the coordinator, and the cluster has {room:g} CPUs "
                          f"and {gpus:g} GPUs left for them and the hosts; raise cluster.num_cpus, lower the institutions' "
                          "cpus, or set scheme.trainer=central")
    return WorkerPlan(n, per_cpu, per_gpu)


def in_trial(plan: WorkerPlan | None, scheme: Mapping[str, Any]) -> WorkerPlan | None:
    """``plan``, unless this run is a Tune trial: there ``auto`` trains centrally and ``ray_train`` is refused.

    A trial's actors live in its placement group, but Ray Train reserves its own; on a
    cluster full of trials its workers would wait for room that never comes.
    """
    from ray.util import get_current_placement_group

    if plan is None or get_current_placement_group() is None:
        return plan
    if scheme.get("trainer") == RAY_TRAIN:
        raise ConfigError("scheme.trainer", "ray_train cannot place its workers inside a Tune trial's reservation; "
                          "use scheme.trainer=auto or central in sweeps")
    return None


class Mailbox:
    """A tiny async actor between the coordinator and the job's workers: the next round's job in, its result out."""

    def __init__(self):
        self.job: dict | None = None
        self.stopped, self.error = False, None
        self.results: dict[int, tuple[State, float]] = {}
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # made inside the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def post(self, job: dict | None) -> None:
        """The next round's job; None ends the workers' loop."""
        async with self._cond():
            self.stopped = self.stopped or job is None
            self.job = job if job is not None else self.job
            self._cond().notify_all()

    async def next(self, seen: int) -> dict | None:
        """Wait for a job newer than ``seen``; None when the job is over."""
        async with self._cond():
            await self._cond().wait_for(lambda: self.stopped or self.error or (self.job and self.job["seq"] > seen))
            return None if self.stopped or self.error else self.job

    async def put(self, seq: int, state: State, loss: float, world: int) -> None:
        """Rank 0's result of job ``seq``."""
        async with self._cond():
            self.results[seq] = (state, loss, world)
            self._cond().notify_all()

    async def result(self, seq: int) -> tuple[State, float, int]:
        """Wait for job ``seq``'s result; raises if the job failed."""
        async with self._cond():
            await self._cond().wait_for(lambda: seq in self.results or self.error)
            if seq not in self.results:
                raise RuntimeError(self.error)
            return self.results.pop(seq)

    async def fail(self, message: str) -> None:
        """The job failed: waiting callers raise ``message``."""
        async with self._cond():
            self.error = message
            self._cond().notify_all()


class DataParallel:
    """The pooled scheme's Trainer on Ray Train (same call as the coordinator's central trainer)."""

    def __init__(self, plan: WorkerPlan, *, model: Mapping[str, Any], shape: tuple, training: TrainingSpec, seed: int,
                 threads: int):
        self.plan, self.training = plan, training
        self.config = {"model": dict(model), "shape": shape, "seed": seed, "threads": threads}
        self.parts: tuple[tuple[int, int], ...] | None = None  # (scenario index, rows) of the running job's workers
        self.mailbox = self.thread = self.storage = None
        self.seq = 0
        self.world = 0  # workers of the last round, as rank 0 saw them
        self.jobs = 0  # jobs started (one per run unless the pool changes)
        self.startup_s = math.nan  # wall seconds from starting the job to the end of its first round

    def __call__(self, state: State, x: np.ndarray, y: np.ndarray, key: tuple[int, ...],
                 parts: Sequence[tuple[int, int]] | None = None) -> tuple[State, float]:
        """One round's training of ``state`` on the pool (x, y), whose rows are ``parts``' shards in order."""
        import ray

        from sim.core.train import scheduled

        parts = tuple((int(i), int(n)) for i, n in (parts if parts is not None else [(0, len(y))]) if n)
        t0 = time.perf_counter()
        fresh = parts != self.parts
        if fresh:  # the pool changed (round 1, or a resumed run): a new job with one worker per shard
            self.close()
            self._start(parts, x, y)
        self.seq += 1
        round = key[1] if len(key) > 1 else 0
        self.mailbox.post.remote({"seq": self.seq, "state": [ray.put(state)], "key": tuple(int(k) for k in key),
                                  "training": scheduled(self.training, round)})
        new, loss, self.world = ray.get(self.mailbox.result.remote(self.seq))
        if fresh:
            self.startup_s = time.perf_counter() - t0
        return new, loss

    def _start(self, parts: tuple[tuple[int, int], ...], x: np.ndarray, y: np.ndarray) -> None:
        """Start the Ray Train job: one worker per shard (``parts``: non-empty ones), in scenario order, fit() in a thread."""
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        edges = np.cumsum([0, *(n for _, n in parts)])
        shards = [(i, [ray.put(x[a:b]), ray.put(y[a:b])]) for (i, _), a, b in zip(parts, edges[:-1], edges[1:])]
        if len(shards) > self.plan.workers:
            raise RuntimeError(f"ray_train: {len(shards)} shards but {self.plan.workers} workers were reserved")
        self.mailbox = ray.remote(Mailbox).options(num_cpus=0).remote()
        self.storage = tempfile.mkdtemp(prefix="collabsim-train-")
        gpus = self.plan.gpus
        config = {**self.config, "mailbox": self.mailbox, "shards": shards, "sizes": [n for _, n in parts]}
        trainer = _trainer_class(TorchTrainer)(
            _worker, train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if gpus >= 1 else "gloo"),  # nccl needs a whole GPU per rank
            scaling_config=ScalingConfig(num_workers=len(shards), use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": self.plan.cpus, **({"GPU": gpus} if gpus else {})}),
            run_config=RunConfig(name="pooled", storage_path=self.storage, failure_config=FailureConfig(max_failures=0)),
        )
        self.thread = threading.Thread(target=_fit, args=(trainer, self.mailbox), daemon=True, name="ray-train-fit")
        self.thread.start()
        self.parts = parts
        self.jobs += 1
        log.info("pooled: Ray Train job with %d worker(s), %g CPU%s each", len(shards), self.plan.cpus,
                 f" and {gpus:g} GPU" if gpus else "")

    def close(self) -> None:
        """End the job (workers leave their loop, fit() returns) and free its resources."""
        if self.mailbox is None:
            return
        import ray

        ray.get(self.mailbox.post.remote(None))
        self.thread.join(timeout=120)
        ray.kill(self.mailbox)
        shutil.rmtree(self.storage, ignore_errors=True)
        self.mailbox = self.thread = self.storage = self.parts = None


def _trainer_class(torch_trainer: type) -> type:
    """TorchTrainer without Ray Train's placement-group cleaner.

    The cleaner (a detached actor, Ray 2.60) asks the state API whether the controller still
    lives; that API needs the dashboard, which collabsim starts only when asked (agents/runtime/cluster.py),
    so it could never clean anything and logs a warning every second for the whole run. The
    job ends its own placement group when fit() returns, which is how every run ends it.
    """

    class Trainer(torch_trainer):
        def _create_default_callbacks(self):  # a private hook: if it goes away, the cleaner simply stays
            return [c for c in super()._create_default_callbacks() if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer


def _fit(trainer: Any, mailbox: Any) -> None:
    """Run the job to its end; a failure reaches whoever waits on the mailbox as one line."""
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - any failure of the job is the round's failure
        lines = str(e).strip().splitlines()
        mailbox.fail.remote(f"the Ray Train job failed: {type(e).__name__}: {lines[0] if lines else ''}")


def _worker(config: dict) -> None:
    """One Ray Train worker: its institution's shard, then one round of DDP training per job until told to stop."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from sim.core.data_parallel import train_round
    from sim.core.models import build_model, get_state, set_state
    from sim.core.train import _to_tensors, deterministic_cuda

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config["threads"])  # fixed, as every institution's: sums do not depend on the machine
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        deterministic_cuda()
    model = build_model(config["model"], *config["shape"], seed=config["seed"])
    ddp = ray.train.torch.prepare_model(model)  # onto the worker's device; wrapped in DDP when there are several
    index, (x_ref, y_ref) = config["shards"][rank]
    x, y = _to_tensors(model, ray.get(x_ref), ray.get(y_ref))
    mailbox, seq = config["mailbox"], 0
    while (job := ray.get(mailbox.next.remote(seq))) is not None:
        seq = job["seq"]
        set_state(model, ray.get(job["state"][0]))
        loss = train_round(ddp, model, x, y, sizes=config["sizes"], rank=rank, index=index, training=job["training"],
                           key=job["key"])
        if rank == 0:
            ray.get(mailbox.put.remote(seq, get_state(model), loss, ctx.get_world_size()))
