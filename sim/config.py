"""From a Hydra config to a validated, frozen :class:`RunSpec`.

Everything a user can get wrong is checked here, before Ray starts, and reported as a
:class:`~sim.types.ConfigError` naming the key. Code below this point receives typed
objects, never raw dicts.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from sim import schema
from sim.scenario import build_scenario, from_sites, uses_sites
from sim.schema import CLUSTER, ENGINE, GPU_POLICIES, PLACEMENTS, RESULTS, TOP, TRAINING, check_group
from sim.stragglers import StragglerSpec, load as load_stragglers
from sim.types import ConfigError, Scenario, TrainingSpec

log = logging.getLogger("collabsim")

__all__ = ["EngineSpec", "GPU_POLICIES", "PLACEMENTS", "RunSpec", "SMOKE_ROUNDS", "load_spec"]
SMOKE_ROUNDS = 3


@dataclass(frozen=True)
class EngineSpec:
    """How the simulation is laid out on the cluster."""

    threads_per_institution: int = 1
    coordinator_cpus: float = 0.25
    pooled_hosts: int | None = None  # None = as many as the CPUs allow
    max_dedicated: int = 16
    gpu_policy: str = "warn"
    round_timeout_s: float = 600.0  # a host that has not answered by then is given up on for the round
    round_deadline_s: float | None = None  # simulated seconds a round waits for updates (sim/stragglers.py); None = no deadline
    backend: str = "ray"  # ray: institutions on Ray actors | inprocess: everything in this process (small runs, tests)
    eval_every: int = 1  # score every N rounds (round 0 and the last round always)
    vectorise: bool = True  # plain local steps of a host's institutions run as one vmapped computation (sim/batched.py)
    eval_scope: str = "all"  # all: every institution is scored | cohort: only the round's cohort (all in the last round)


@dataclass(frozen=True)
class RunSpec:
    """One fully validated simulation: who, how, with what model and data, for how long."""

    seed: int
    rounds: int
    placement: str
    scenario: Scenario
    scheme_name: str
    scheme: Mapping[str, Any]  # the scheme group, for hydra.utils.instantiate
    model: Mapping[str, Any]
    data: Mapping[str, Any]
    training: TrainingSpec
    engine: EngineSpec
    cluster: Mapping[str, Any]
    smoke: bool = False
    config_hash: str = ""
    only: tuple[str, ...] | None = field(default=None)  # coalition: the institutions that take part
    checkpoint_every: int = 0  # rounds between checkpoints; 0 = none
    resume: str | None = None  # the run directory this run continues
    overwrite: bool = False  # a fresh run may replace what an earlier one left in its directory (not part of run_id)
    stragglers: StragglerSpec = field(default_factory=StragglerSpec)  # slowdowns and deadline
    select: str = "best_val"  # results.select: which round's model each institution is reported with (sim.results)
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the validated config, as written to config.yaml

    @property
    def run_id(self) -> str:
        """Stable id: the same config gives the same id, on any machine."""
        suffix = "" if self.only is None else "-" + "+".join(self.only)
        return f"{self.scheme_name}-{self.scenario.name}-s{self.seed}-{self.config_hash}{suffix}"

    def restrict(self, names: tuple[str, ...]) -> "RunSpec":
        """The same run with only ``names`` taking part (data and seeds unchanged)."""
        unknown = sorted(set(names) - set(self.scenario.names))
        if unknown:
            raise ConfigError("institutions", f"unknown institution {unknown[0]!r}")
        return replace(self, only=tuple(n for n in self.scenario.names if n in set(names)))


def load_spec(cfg: DictConfig | Mapping[str, Any]) -> RunSpec:
    """Validate a composed config and freeze it into a RunSpec (raises ConfigError)."""
    c = cfg if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig) else OmegaConf.to_container(cfg, resolve=True)
    c = {k: v for k, v in check_group("", c, TOP, allowed=schema.OTHER_ENTRY_POINTS).items() if k != "hydra"}
    if isinstance(c.get("resume"), str):
        return _resumed(c["resume"])
    if not (c.get("resume") is None or isinstance(c["resume"], bool)):
        raise ConfigError("resume", f"expected the run directory to continue, got {c['resume']!r}")
    seed = _int(c, "seed", minimum=0)
    smoke = c.get("smoke", False)
    rounds = _int(c, "rounds", minimum=1)
    if smoke:
        rounds = min(rounds, SMOKE_ROUNDS)
    scenario, c = _scenario(c, seed)
    schema.check_costs(c.get("costs"), scenario.names)  # prices (analysis/costs.py): checked now, priced after the run
    scheme_name = _scheme_name(c.get("scheme") or {})
    engine = _engine(c.get("engine") or {})
    # Where a run was resumed from, whether it may replace an earlier run's files and what its compute is priced at
    # are not what it is: none of them changes a number it computes.
    hashed = {k: v for k, v in c.items() if k not in ("resume", "overwrite", "costs")}
    spec = RunSpec(
        seed=seed,
        rounds=rounds,
        placement=c.get("placement", "auto"),
        scenario=scenario,
        scheme_name=scheme_name,
        scheme=c["scheme"],
        model=_group(c, "model"),
        data=_group(c, "data"),
        training=replace(_training(c.get("training") or {}), rounds=rounds),
        engine=engine,
        stragglers=load_stragglers(c.get("scenario") or {}, engine.round_deadline_s, scenario.names),
        cluster=check_group("cluster", c.get("cluster") or {}, CLUSTER),
        smoke=smoke,
        config_hash=hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:8],
        checkpoint_every=c.get("checkpoint_every", 0),
        overwrite=bool(c.get("overwrite", False)),
        select=check_group("results", c.get("results") or {}, RESULTS).get("select", "best_val"),
        config={**hashed, "resume": None, **({"costs": c["costs"]} if c.get("costs") is not None else {})},
    )
    check_address(spec.cluster.get("address"))  # cheap, so before the groups are built
    _check_groups(spec)
    return spec


def _resumed(run_dir: str) -> RunSpec:
    """The spec of the run saved in ``run_dir`` (its config.yaml), marked as resumed."""
    saved = saved_config(run_dir, "resume", "give the run directory of the run to continue")
    if isinstance(saved.get("resume"), str):
        raise ConfigError("resume", f"{run_dir}/config.yaml is not the config of a run")
    spec = replace(load_spec(saved), resume=str(Path(run_dir).expanduser()))
    _check_unedited(run_dir, spec, saved)
    return spec


def _check_unedited(run_dir: str, spec: RunSpec, saved: Mapping[str, Any]) -> None:
    """Refuse a resume whose config.yaml no longer makes the run id its status.json records (it was edited)."""
    from sim import checkpoint, rundir

    status = checkpoint.read_status(Path(run_dir).expanduser())
    recorded, members = status.get("run_id"), status.get("institutions")
    if not isinstance(recorded, str):
        return  # no status (a run from before status.json): the checkpoint's own run id is checked on load
    try:
        expected = spec.restrict(tuple(members)).run_id if isinstance(members, list) else spec.run_id
    except ConfigError:
        expected = spec.run_id
    if expected == recorded:
        return
    made = rundir.read_marker(Path(run_dir).expanduser(), rundir.RUN_MARKER).get("config")
    ignored = {"resume", "overwrite", "costs"}
    keys = [k for k in rundir.changed_keys(made, dict(saved)) if k.split(".")[0] not in ignored] if made else []
    what = f" (changed: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})" if keys else ""
    raise ConfigError("resume", f"{run_dir}/config.yaml was edited after the run{what}: the directory belongs to run "
                      f"{recorded!r}, the config now makes {expected!r}; undo the edit, or start a new run with it")


def saved_config(run_dir: str | Path, key: str, fix: str) -> dict[str, Any]:
    """The resolved config.yaml a run directory holds; a ConfigError on ``key`` when there is none to read."""
    path = Path(run_dir).expanduser()
    if not (path / "config.yaml").is_file():
        why = "no such directory" if not path.is_dir() else "no config.yaml there"
        raise ConfigError(key, f"{run_dir}: {why}; {fix}")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is bad input like any other
        raise ConfigError(key, f"{run_dir}/config.yaml cannot be read ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise ConfigError(key, f"{run_dir}/config.yaml is not the config of a run")
    return saved


def _scenario(c: dict[str, Any], seed: int) -> tuple[Scenario, dict[str, Any]]:
    """The scenario, and the config it runs with: the table's sites (data partitioned by site) or the scenario's own list.

    A table spread over the built-in scenario's fictional institutions is allowed (its rows are
    partitioned as data.partition says) but warned about: it is rarely what a user with sites meant.
    """
    cfg, data = c.get("scenario") or {}, c.get("data") or {}
    if isinstance(data, Mapping) and uses_sites(cfg, data):
        from sim.data import sites_from_table

        data = {**data, "partition": "natural"}
        stem = re.sub(r"[^\w.-]+", "_", Path(str(data.get("path") or "sites")).stem) or "sites"
        return from_sites(cfg, stem, sites_from_table(data)), {**c, "data": data}
    scenario = build_scenario(cfg, seed)
    if isinstance(data, Mapping) and data.get("name") in ("table", "text") and cfg.get("from_data") == "auto" \
            and data.get("partition") != "natural":
        _warn_once(f"warning: data.path: the rows of {Path(str(data.get('path'))).name} are spread over the "
                   f"{len(scenario.institutions)} fictional institutions of scenario={scenario.name}; to make each "
                   "site of the file an institution, set data.institution_column=COLUMN")
    return scenario, c


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """Log a warning once per process (the pre-run check and the run both load the spec)."""
    log.warning(message)


def _group(c: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A config group that must be present."""
    g = c.get(name)
    if not g:
        raise ConfigError(name, f"missing config group; pick one with {name}=<name>")
    return g


def _scheme_name(scheme: Mapping[str, Any]) -> str:
    """Registry name of the scheme the group's _target_ points at."""
    from agents.schemes import SCHEMES

    target = scheme.get("_target_")
    for name, cls in SCHEMES.items():
        if target == f"{cls.__module__}.{cls.__qualname__}":
            return name
    raise ConfigError("scheme._target_", f"{target!r} is not a registered scheme; known: {', '.join(sorted(SCHEMES))}")


def _check_groups(spec: RunSpec) -> None:
    """Build the scheme and model once in the driver so bad keys fail here, not in an actor."""
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate

    from sim.data import check_data
    from sim.models import build_model

    schema.check_by_signature("scheme", spec.scheme, get_object(spec.scheme["_target_"]), schema.Field("int", 0))
    try:
        scheme = instantiate(dict(spec.scheme))
    except (InstantiationException, TypeError, ValueError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
        raise cause or ConfigError("scheme", _first_line(e)) from None
    scheme.check(len(spec.only or spec.scenario.institutions))  # e.g. Krum's cohort bound, before any actor starts
    scheme.check_institutions([s for s in spec.scenario.institutions if spec.only is None or s.name in spec.only])
    if getattr(scheme, "asynchronous", False) and spec.engine.round_deadline_s is not None:
        raise ConfigError("engine.round_deadline_s", f"{spec.scheme_name} is asynchronous: no round waits for its "
                          "slowest member, so there is no deadline to miss; set engine.round_deadline_s=null")
    _check_dp_sgd(spec, scheme)
    schema.check_data_types(spec.data)
    check_data(spec.data, spec.scenario, spec.model)
    if spec.select == "best_val" and not (spec.data.get("val_fraction") or 0) > 0:
        raise ConfigError("results.select", "best_val chooses each institution's round on its validation split, and "
                          "data.val_fraction is 0: set data.val_fraction (e.g. 0.15) or results.select=last")
    target = schema.check_value("model._target_", spec.model.get("_target_"), schema.Field("str"))
    schema.check_by_signature("model", spec.model, _factory(target), schema.Field("int", 1, schema.MAX_WIDTH))
    if target.startswith("sim.models.foundation."):
        from sim.data import TEXT
        from sim.models.foundation import check_config

        if spec.data.get("name") not in TEXT:  # a transformer embeds token ids; numeric features would fail mid-run
            raise ConfigError("model", f"{target} takes token ids, not data={spec.data.get('name')}; "
                              f"use a text dataset ({', '.join(f'data={t}' for t in TEXT)}) or a numeric model such as model=mlp")
        check_config(spec.model)  # pretrained folder, config.json, adapter and LoRA targets; reads no weights
    else:  # shapes are checked for real when the data is built; a meta-device probe (no memory) catches bad keys now
        with torch.device("meta"):
            probe = build_model(spec.model, (1, 8, 8) if spec.model.get("_target_", "").endswith("cnn") else (4,), 2, seed=0)
        _check_dp_model(spec, probe)
    _check_resources(spec)


def _check_dp_sgd(spec: RunSpec, scheme: Any) -> None:
    """DP-SGD (sim.dp_sgd, Opacus) needs local SGD steps, in fp32, on a numeric model (not a transformer)."""
    private = next((s for s in spec.scenario.institutions if s.private), None)
    if private is None:
        return
    key = f"scenario.institutions[{private.index}].dp_noise_multiplier"
    plan = scheme.plan(1)
    if plan.one_step or plan.upload == "data":
        raise ConfigError(key, f"DP-SGD privatises local SGD steps, but scheme {spec.scheme.get('_target_')} sends "
                          f"{'a full-shard gradient' if plan.one_step else 'raw data'}; use a weights-sending scheme")
    if str(spec.model.get("_target_", "")).startswith("sim.models.foundation."):
        raise ConfigError(key, "DP-SGD is not supported for text/transformer models; use a numeric model (model=mlp)")
    if spec.training.precision != "fp32":
        raise ConfigError("training.precision", "DP-SGD computes per-sample gradients in fp32; set it to fp32")


def _check_dp_model(spec: RunSpec, model: torch.nn.Module) -> None:
    """A private institution's model must be one Opacus computes per-sample gradients for (no BatchNorm, ...)."""
    from sim import dp_sgd

    private = next((s for s in spec.scenario.institutions if s.private), None)
    if private is not None and (why := dp_sgd.unsupported(model)):
        raise ConfigError("model", f"DP-SGD (scenario.institutions[{private.index}].dp_noise_multiplier) cannot "
                          f"train {spec.model.get('_target_')}: {why}; use a model without it (e.g. model=mlp)")


def _factory(target: str) -> Any:
    """The model factory ``target`` names (imported quietly: Hydra's own lookup logs a multi-line error)."""
    module, _, name = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError("model._target_", f"cannot import {target!r} ({type(e).__name__}); "
                          "check the spelling, e.g. sim.models.mlp") from None
    if not callable(factory):
        raise ConfigError("model._target_", f"{target!r} is not a model factory; use e.g. sim.models.mlp")
    return factory


def _check_resources(spec: RunSpec) -> None:
    """Refuse a bad cluster address, and on a local cluster any request its CPUs and GPUs cannot meet, before Ray starts.

    The local cluster's size is cluster.num_cpus / num_gpus, or when null what this machine has.
    """
    from agents.placement import check_requests, plan_layout

    if spec.cluster.get("address") is not None:
        return  # a remote cluster's size is known only once joined; plan_layout checks it then
    check_dashboard(spec.cluster)
    cpus, gpus = spec.cluster.get("num_cpus"), spec.cluster.get("num_gpus")
    cpus = float(os.cpu_count() or 1) if cpus is None else float(cpus)
    gpus = float(_local_gpus()) if gpus is None else float(gpus)
    check_requests(spec, spec.scenario.institutions, cpus, gpus)
    plan_layout(spec, spec.scenario.institutions, cpus, gpus)


def check_dashboard(cluster: Mapping[str, Any]) -> None:
    """Refuse cluster.dashboard=true for a local cluster when Ray's dashboard packages are missing (Ray would start
    without it, or fail, after the run had begun)."""
    import importlib.util

    if cluster.get("dashboard") and not cluster.get("address"):
        missing = [m for m in DASHBOARD_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError("cluster.dashboard", f"Ray's dashboard needs packages this environment lacks "
                              f"({', '.join(missing)}): pip install 'ray[default]', or leave cluster.dashboard=false")


DASHBOARD_MODULES = ("aiohttp", "aiohttp_cors", "opencensus", "prometheus_client")
"""What ``ray[default]`` adds that Ray's dashboard imports."""


def _local_gpus() -> int:
    """GPUs torch sees on this machine (what a local Ray cluster would offer)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


ADDRESS_FORMS = "auto, HOST:PORT or ray://HOST:PORT (port 1-65535)"


def check_address(address: Any) -> tuple[str, int] | None:
    """Check cluster.address's form; return (host, port) for HOST:PORT and ray://HOST:PORT, None for null/auto."""
    if address is None or address == "auto":
        return None
    bad = ConfigError("cluster.address", f"expected {ADDRESS_FORMS}, got {address!r}")
    if not isinstance(address, str):
        raise bad
    m = re.fullmatch(r"(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.\-_]*[A-Za-z0-9])?):(\d{1,5})", address)
    if m is None:
        raise bad
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise ConfigError("cluster.address", f"port {port} is out of range (1-65535) in {address!r}")
    return m.group(1).strip("[]"), port


def _first_line(e: BaseException) -> str:
    """The most specific line of a (possibly chained) exception."""
    inner = e.__cause__ or e
    return str(inner).strip().splitlines()[-1] if str(inner).strip() else type(inner).__name__


def _training(t: Mapping[str, Any]) -> TrainingSpec:
    """Local-training hyperparameters, typed and range-checked by the schema."""
    check_group("training", t, TRAINING)
    defaults = TrainingSpec()
    return TrainingSpec(**{k: t.get(k, getattr(defaults, k)) for k in TRAINING})


def _engine(e: Mapping[str, Any]) -> EngineSpec:
    """Engine layout settings, typed and range-checked by the schema."""
    check_group("engine", e, ENGINE)
    defaults = EngineSpec()
    values = {k: e.get(k, getattr(defaults, k)) for k in ENGINE}
    values["pooled_hosts"] = None if values["pooled_hosts"] == "auto" else values["pooled_hosts"]
    return EngineSpec(**values)


def _int(c: Mapping[str, Any], key: str, *, minimum: int) -> int:
    """A whole number >= minimum that must be present."""
    v = c.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(key, f"expected a whole number >= {minimum}, got {v!r}")
    return v
