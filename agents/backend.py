"""Backends run a round's work: in this process (tests, coalitions) or on Ray actors.

Both drive the same :class:`~agents.host.Host` and :class:`~agents.coordinator.Coordinator`
classes, so a result cannot depend on which backend produced it. The engine sees only
the four methods of :class:`Backend`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from agents.coordinator import Coordinator
from agents.host import Host
from agents.placement import Layout
from sim.config import RunSpec
from sim.types import Federation, InstitutionSpec, LocalPlan, RoundContext

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the engine's round loop needs from wherever the institutions live."""

    def begin_round(self, round: int, sim_time: float) -> RoundContext:
        """Ask the coordinator for this round's cohort and plan."""

    def train_and_merge(self, ctx: RoundContext) -> list[dict[str, Any]]:
        """Local steps of the cohort, then the merge; returns ledger rows."""

    def evaluate(self, plan: LocalPlan) -> tuple[dict[str, float], list[tuple[str, dict[str, float]]]]:
        """Global-test scores and each institution's test scores."""

    def close(self) -> None:
        """Release actors."""


def _kwargs(spec: RunSpec, fed: Federation, flops: int) -> tuple[dict, dict]:
    """Constructor arguments shared by hosts and coordinator."""
    common = dict(
        model=spec.model, shape=(fed.input_shape, fed.num_classes), training=spec.training, seed=spec.seed,
        global_test=(fed.x_test, fed.y_test), threads=spec.engine.threads_per_institution,
    )
    coord = dict(common, scheme=spec.scheme, flops_per_sample=flops)
    return common, coord


class InProcessBackend:
    """Everything in this process, one host for all: no Ray, for tests and small coalitions."""

    def __init__(self, spec: RunSpec, specs: tuple[InstitutionSpec, ...], fed: Federation, flops: int):
        common, coord = _kwargs(spec, fed, flops)
        self.coordinator = Coordinator(specs, **coord)
        self.host = Host(specs, [fed.shards[s.index] for s in specs], initial=self.coordinator.current_state(), **common)
        self.state = None

    def begin_round(self, round: int, sim_time: float) -> RoundContext:
        ctx, self.state = self.coordinator.begin_round(round, sim_time)
        return ctx

    def train_and_merge(self, ctx: RoundContext) -> list[dict[str, Any]]:
        return self.coordinator.merge(ctx, self.host.train(ctx, self.state))

    def evaluate(self, plan: LocalPlan):
        state = self.coordinator.current_state()  # the current global state
        return self.coordinator.evaluate(), self.host.evaluate(plan, state)

    def close(self) -> None:
        pass


class RayBackend:
    """Hosts and coordinator as Ray actors with the resources the layout asks for."""

    def __init__(self, spec: RunSpec, specs: tuple[InstitutionSpec, ...], fed: Federation, flops: int, layout: Layout):
        import ray

        self.ray = ray
        common, coord = _kwargs(spec, fed, flops)
        # Ship big arrays once through the object store; actors read them zero-copy.
        common["global_test"] = ray.put(common["global_test"])
        coord["global_test"] = common["global_test"]
        env = {"env_vars": {"OMP_NUM_THREADS": str(spec.engine.threads_per_institution)}}
        self.coordinator = ray.remote(Coordinator).options(
            num_cpus=layout.coordinator_cpus, runtime_env=env
        ).remote(specs, **coord)
        initial = self.coordinator.current_state.remote()
        by_index = {s.index: s for s in specs}
        self.hosts = [
            ray.remote(Host).options(num_cpus=h.cpus, num_gpus=h.gpus, runtime_env=env).remote(
                [by_index[i] for i in h.indices], [fed.shards[i] for i in h.indices], initial=initial, **common
            )
            for h in layout.hosts
        ]
        self.members = [{by_index[i].name for i in h.indices} for h in layout.hosts]
        self.pids = ray.get([h.ready.remote() for h in self.hosts])
        self.state_ref = None

    def begin_round(self, round: int, sim_time: float) -> RoundContext:
        ctx_ref, self.state_ref = self.coordinator.begin_round.options(num_returns=2).remote(round, sim_time)
        return self.ray.get(ctx_ref)

    def train_and_merge(self, ctx: RoundContext) -> list[dict[str, Any]]:
        cohort = set(ctx.cohort)
        # Fan out to every host with a cohort member; the coordinator resolves the updates itself.
        refs = [h.train.remote(ctx, self.state_ref) for h, m in zip(self.hosts, self.members) if m & cohort]
        return self.ray.get(self.coordinator.merge.remote(ctx, *refs))

    def evaluate(self, plan: LocalPlan):
        state = self.coordinator.current_state.remote()
        futures = [self.coordinator.evaluate.remote()] + [h.evaluate.remote(plan, state) for h in self.hosts]
        glob, *per_host = self.ray.get(futures)
        return glob, [row for rows in per_host for row in rows]

    def devices(self) -> list[str]:
        """Where each host trains ('cpu' or 'cuda:N')."""
        return self.ray.get([h.device.remote() for h in self.hosts])

    def close(self) -> None:
        for a in [self.coordinator, *self.hosts]:
            self.ray.kill(a)


def connect(cluster: dict[str, Any]) -> tuple[float, float]:
    """Start or join Ray per the ``cluster`` group; return the cluster's (CPUs, GPUs)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs: dict[str, Any] = {"address": cluster.get("address"), "include_dashboard": False,
                                  "log_to_driver": True, "configure_logging": False}
        if not cluster.get("address"):
            kwargs.update(num_cpus=cluster.get("num_cpus"), num_gpus=cluster.get("num_gpus"))
            if cluster.get("temp_dir"):
                kwargs["_temp_dir"] = str(cluster["temp_dir"])
        ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    res = ray.available_resources() if _in_placement_group() else ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def _in_placement_group() -> bool:
    """True inside a Tune trial or task that runs in a placement group."""
    import ray

    try:
        return ray.get_runtime_context().get_placement_group_id() is not None
    except Exception:  # noqa: BLE001 - older Ray without the call: assume not
        return False
