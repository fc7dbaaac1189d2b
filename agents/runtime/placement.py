"""Where institutions run: which host carries whom, with what CPU/GPU request.

Pure planning over the cluster's resources (no Ray calls), so every impossible request
is refused with a ConfigError before a single actor starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agents.runtime.ray_train import WorkerPlan, worker_plan
from sim.core.config import RunSpec
from sim.core.types import ConfigError, InstitutionSpec

EPS = 1e-9


@dataclass(frozen=True)
class HostPlan:
    """One host actor: the institutions it carries and its resource request."""

    indices: tuple[int, ...]  # positions in the scenario
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Layout:
    """The placement decided for a run."""

    mode: str  # dedicated | pooled
    hosts: tuple[HostPlan, ...]
    coordinator_cpus: float
    warnings: tuple[str, ...] = ()
    workers: WorkerPlan | None = None  # pooled on Ray Train: room kept for its workers (agents/runtime/ray_train.py)

    @property
    def bundles(self) -> list[dict[str, float]]:
        """Resource bundles (coordinator first), for a placement group that reserves the whole run."""
        w = self.workers
        return [{"CPU": self.coordinator_cpus}] + [
            {"CPU": h.cpus, **({"GPU": h.gpus} if h.gpus else {})} for h in self.hosts
        ] + ([{"CPU": w.cpus, **({"GPU": w.gpus} if w.gpus else {})}] * w.workers if w else [])


def check_requests(spec: RunSpec, specs: tuple[InstitutionSpec, ...], cpus: float, gpus: float) -> None:
    """Refuse an institution asking more CPUs or GPUs than the whole (local) cluster has, whatever the placement.

    Pooled hosts share out the cluster's CPUs and ignore each institution's own request, so
    without this a request of 64 CPUs on a 2-CPU laptop would run silently on a fraction of one.
    """
    for s in specs:
        if s.cpus > cpus + EPS:
            raise ConfigError(f"scenario.institutions[{s.index}].cpus",
                              f"'{s.name}' asks for {s.cpus:g} CPUs but the local cluster has {cpus:g}; "
                              "lower its cpus (or set cluster.num_cpus to the cores Ray may use)")
        if s.gpus > gpus + EPS and (gpus > 0 or spec.engine.gpu_policy == "require"):
            raise ConfigError(f"scenario.institutions[{s.index}].gpus",
                              f"'{s.name}' asks for {s.gpus:g} GPUs but the local cluster has {gpus:g}; lower its gpus"
                              + ("" if gpus > 0 else " or set engine.gpu_policy=warn to run on CPU"))


def plan_layout(spec: RunSpec, specs: tuple[InstitutionSpec, ...], cpus: float, gpus: float,
                nodes: list[float] | None = None) -> Layout:
    """Decide dedicated or pooled hosts for ``specs`` on a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    ``nodes``: each node's CPUs on a cluster of several; pooled hosts are then sized to what each node holds."""
    warnings: list[str] = []
    asked_gpus = sum(s.gpus for s in specs)
    if asked_gpus > 0 and gpus == 0:
        if spec.engine.gpu_policy == "require":
            first = next(s for s in specs if s.gpus > 0)
            raise ConfigError(
                f"scenario.institutions[{first.index}].gpus",
                "asks for a GPU but the cluster has none; set gpus: 0 or engine.gpu_policy=warn to run on CPU",
            )
        warnings.append(f"the scenario asks for {asked_gpus:g} GPUs but the cluster has none: running on CPU")
        gpus_of = {s.index: 0.0 for s in specs}
    else:
        gpus_of = {s.index: s.gpus for s in specs}
        for s in specs:
            if s.gpus > 1 and s.gpus != int(s.gpus):
                raise ConfigError(f"scenario.institutions[{s.index}].gpus", "above 1 a GPU request must be whole")
    coord = spec.engine.coordinator_cpus
    # Pooled on Ray Train: its workers' room comes first; the hosts only hand data over and score, so on CPU.
    train = worker_plan(spec, specs, cpus, gpus, cpus - coord)
    if train is not None:
        cpus, gpus = cpus - train.workers * train.cpus, gpus - train.workers * train.gpus
        gpus_of = dict.fromkeys(gpus_of, 0.0)
    mode = spec.placement
    fits = sum(s.cpus for s in specs) + coord <= cpus + EPS and sum(gpus_of.values()) <= gpus + EPS
    if mode == "dedicated" and not fits and spec.resume:  # resumed on fewer nodes: placement cannot change a number
        warnings.append(f"the saved placement=dedicated asks for {sum(s.cpus for s in specs) + coord:g} CPUs and the "
                        f"cluster has {cpus:g}: the resumed run continues on pooled hosts (the same numbers)")
        mode = "pooled"
    if mode == "auto":
        # One process per institution only while there are cores for them: each process imports torch
        # (~300 MB, seconds to start), and more processes than cores cannot train at the same time anyway.
        few = len(specs) <= min(spec.engine.max_dedicated, cpus + EPS)
        mode = "dedicated" if few and fits else "pooled"
    if mode == "dedicated":
        if sum(gpus_of.values()) > gpus + EPS:
            raise ConfigError("scenario", f"the institutions ask for {sum(gpus_of.values()):g} GPUs but the cluster has {gpus:g}; lower their gpus")
        if not fits:
            raise ConfigError(
                "placement",
                f"dedicated actors ask for {sum(s.cpus for s in specs) + coord:g} CPUs but the cluster has {cpus:g}; "
                "lower the institutions' cpus or use placement=pooled",
            )
        hosts = tuple(HostPlan((s.index,), s.cpus, gpus_of[s.index]) for s in specs)
        return Layout("dedicated", hosts, coord, tuple(warnings), train)
    # Pooled: one host per (possibly partial) free CPU; institutions dealt round-robin for balance.
    free = cpus - coord
    if free <= 0:
        raise ConfigError("engine.coordinator_cpus", f"the coordinator asks for {coord:g} CPUs, the cluster has {cpus:g}")
    k = spec.engine.pooled_hosts or max(1, math.ceil(free - EPS))
    k = min(k, len(specs))
    sizes = [min(1.0, free / k)] * k
    if nodes and len(nodes) > 1 and train is None and spec.engine.pooled_hosts is None:
        sizes = node_sized(nodes, coord)[:len(specs)] or sizes
        k = len(sizes)
    hosts = []
    for j in range(k):
        members = tuple(s.index for s in specs[j::k])
        g = min(1.0, sum(gpus_of[i] for i in members))
        hosts.append(HostPlan(members, sizes[j], g))
    if sum(h.gpus for h in hosts) > gpus + EPS:
        raise ConfigError("scenario", f"the pooled hosts need {sum(h.gpus for h in hosts):g} GPUs but the cluster has {gpus:g}")
    return Layout("pooled", tuple(hosts), coord, tuple(warnings), train)


def node_sized(nodes: list[float], coordinator: float) -> list[float]:
    """Pooled hosts' CPU requests that pack into nodes of these CPUs, largest first (the order they are started in).

    Equal hosts sized on the cluster's total need not fit any node (three 1-CPU nodes and a 0.25-CPU coordinator
    left room for no 0.92-CPU host beside it): each node instead gets as many hosts of at most one CPU as its
    whole CPUs, sharing what it has, the coordinator's share taken from the largest. [] when none fits."""
    room = sorted(nodes, reverse=True)
    room[0] -= coordinator
    sizes = [c / math.ceil(c - EPS) for c in room if c > EPS for _ in range(math.ceil(c - EPS))]
    return sorted(sizes, reverse=True)
