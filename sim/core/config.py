"""From a Hydra config to a typed, frozen :class:`RunSpec`.

Every key is type- and range-checked here (against :mod:`sim.core.schema`) and reported as a
:class:`~sim.core.types.ConfigError` naming the key. Code below this point receives typed
objects, never raw dicts. The checks that need the layers above (building the scheme, the
model, the placement) run in :func:`sim.checks.load_spec`, before any actor starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from sim.core import legacy, schema
from sim.core.scenario import build_scenario, from_sites, uses_sites
from sim.core.schema import CLUSTER, ENGINE, GPU_POLICIES, PLACEMENTS, RESULTS, TOP, TRAINING, check_group
from sim.core.stragglers import StragglerSpec, load as load_stragglers
from sim.core.types import CONFIG, ConfigError, Scenario, TrainingSpec, defaults, listing

log = logging.getLogger("collabsim")

__all__ = ["EXECUTION_KEYS", "EngineSpec", "GPU_POLICIES", "PLACEMENTS", "RunSpec", "SMOKE_ROUNDS", "parse_spec"]
SMOKE_ROUNDS = 3

EXECUTION_KEYS = ("placement", "checkpoint_every", "cluster", "engine.backend", "engine.pooled_hosts",
                  "engine.max_dedicated", "engine.coordinator_cpus", "engine.round_timeout_s")
"""Keys that say where and how a run executes, never what it computes (the determinism contract: the same numbers
on any placement, number of hosts, backend or cluster; RNGs seeded by round, so checkpoints do not move them either).
A resumed run may change these (``python -m sim resume=DIR placement=pooled``) and keeps every other saved key.
Not here: engine.vectorise and threads_per_institution (equal only to float rounding), gpu_policy (another device)."""


ENGINE_DEFAULTS = defaults("engine")


@dataclass(frozen=True)
class EngineSpec:
    """How the simulation is laid out on the cluster (defaults: conf/config.yaml's ``engine``, which explains each)."""

    threads_per_institution: int = ENGINE_DEFAULTS["threads_per_institution"]
    coordinator_cpus: float = ENGINE_DEFAULTS["coordinator_cpus"]
    pooled_hosts: int | None = None if ENGINE_DEFAULTS["pooled_hosts"] == "auto" else ENGINE_DEFAULTS["pooled_hosts"]
    max_dedicated: int = ENGINE_DEFAULTS["max_dedicated"]
    gpu_policy: str = ENGINE_DEFAULTS["gpu_policy"]
    round_timeout_s: float = ENGINE_DEFAULTS["round_timeout_s"]  # a host silent this long is given up for the round
    round_deadline_s: float | None = ENGINE_DEFAULTS["round_deadline_s"]  # simulated seconds a round waits; None: none
    backend: str = ENGINE_DEFAULTS["backend"]  # ray | inprocess
    eval_every: int = ENGINE_DEFAULTS["eval_every"]  # score every N rounds (round 0 and the last round always)
    vectorise: bool = ENGINE_DEFAULTS["vectorise"]  # a host's plain local steps as one computation (sim/core/batched.py)
    eval_scope: str = ENGINE_DEFAULTS["eval_scope"]  # all | cohort: who is scored (all in the last round)


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
    select: str = "best_val"  # results.select: which round's model each institution is reported with (sim.core.results)
    # The features that wrap the scheme (agents/wrappers): group -> its config, only those that wrap something
    wrappers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Architectures institutions declare of their own (scenario rows' ``model``): name -> model config; the run's
    # ``model`` is not among them (institutions without one, or with one that equals it, train that)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
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
            raise ConfigError("institutions", f"unknown institution(s) {listing(map(repr, unknown))}; the scenario has "
                              f"{listing(self.scenario.names, 8)}")
        return replace(self, only=tuple(n for n in self.scenario.names if n in set(names)))


def parse_spec(cfg: DictConfig | Mapping[str, Any], schemes: Mapping[str, str]) -> RunSpec:
    """Type-check a composed config and freeze it into a RunSpec (raises ConfigError); ``schemes`` maps each registered
    scheme's class path to its registry name. The checks that build schemes, models and layouts are the top
    layer's (:func:`sim.checks.load_spec`), which every command calls."""
    c = cfg if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig) else OmegaConf.to_container(cfg, resolve=True)
    c = {k: v for k, v in check_group("", c, TOP, allowed=schema.OTHER_ENTRY_POINTS).items() if k != "hydra"}
    if isinstance(c.get("resume"), str):
        return _resumed(c["resume"], schemes, c)
    if not (c.get("resume") is None or isinstance(c["resume"], bool)):
        raise ConfigError("resume", f"expected the run directory to continue, got {c['resume']!r}")
    seed = _int(c, "seed", minimum=0)
    smoke = c.get("smoke", False)
    rounds = _int(c, "rounds", minimum=1)
    if smoke:
        rounds = min(rounds, SMOKE_ROUNDS)
    scenario, c = _scenario(c, seed)
    schema.check_costs(c.get("costs"), scenario.names)  # prices (analysis/costs.py): checked now, priced after the run
    scheme_name = _scheme_name(c.get("scheme") or {}, schemes)
    scheme_cfg, wrappers = _wrappers(c)
    engine = _engine(c.get("engine") or {})
    # Where a run was resumed from, whether it may replace an earlier run's files, what its compute is priced at and
    # where it is tracked (sim.tracking, the commands' own key) are not what it is: none changes a number it computes.
    hashed = {k: v for k, v in c.items() if k not in ("resume", "overwrite", "costs", "tracking")}
    if isinstance(hashed.get("data"), Mapping) and "public" in hashed["data"] and hashed["data"]["public"] is None:
        # no public set (the default) is what every run had before the key existed: the same config, the same run id
        hashed["data"] = {k: v for k, v in hashed["data"].items() if k != "public"}
    model = legacy.model(_group(c, "model"))
    scenario, models = own_models(scenario, model)
    hashed = _without_unset_views(hashed)
    spec = RunSpec(
        seed=seed,
        rounds=rounds,
        placement=c.get("placement", "auto"),
        scenario=scenario,
        scheme_name=scheme_name,
        scheme=scheme_cfg,
        wrappers=wrappers,
        model=model,
        models=models,
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
    return spec


def own_models(scenario: Scenario, model: Mapping[str, Any]) -> tuple[Scenario, dict[str, dict[str, Any]]]:
    """The scenario with each institution's own ``model`` resolved (conf/model/<name>.yaml), and those models by name.

    An institution whose model equals the run's ``model`` trains the run's architecture: its ``model`` is cleared, so
    only institutions that really differ count as heterogeneous (and are named when a scheme refuses them)."""
    folder = CONFIG.parent / "model"
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    models: dict[str, dict[str, Any]] = {}
    specs = []
    for s in scenario.institutions:
        if s.model is not None and s.model not in models:
            if s.model not in known:
                raise ConfigError(f"scenario.institutions[{s.index}].model", f"unknown model {s.model!r} for "
                                  f"'{s.name}'; choose one of {', '.join(known)} (conf/model/), or remove it for the "
                                  "run's model")
            models[s.model] = OmegaConf.to_container(OmegaConf.load(folder / f"{s.model}.yaml"), resolve=True)
        same = s.model is not None and dict(models[s.model]) == dict(model)
        specs.append(replace(s, model=None) if same else s)
    used = {s.model for s in specs if s.model is not None}
    return replace(scenario, institutions=tuple(specs)), {k: v for k, v in models.items() if k in used}


def _without_unset_views(c: dict[str, Any]) -> dict[str, Any]:
    """The config less the view keys of data (sim.core.data.views) when no views are set: runs of one feature space
    keep the ids (config hashes) they had before views existed."""
    data = c.get("data")
    if not isinstance(data, Mapping) or data.get("views"):
        return c
    unset = {"views": None, "label_holder": None, "overlap": 1.0, "entity_column": None}
    return {**c, "data": {k: v for k, v in data.items() if not (k in unset and v == unset[k])}}


def _resumed(run_dir: str, schemes: Mapping[str, str], given: Mapping[str, Any]) -> RunSpec:
    """The spec of the run saved in ``run_dir`` (its config.yaml), marked as resumed, executed as ``given`` says.

    Of ``given`` (the resuming command's composed config) only :data:`EXECUTION_KEYS` that differ from
    their defaults count; the run id, config.yaml and every number stay the saved run's."""
    saved = saved_config(run_dir, "resume", "give the run directory of the run to continue")
    if isinstance(saved.get("resume"), str):
        raise ConfigError("resume", f"{run_dir}/config.yaml is not the config of a run")
    spec = replace(parse_spec(saved, schemes), resume=str(Path(run_dir).expanduser()))
    _check_unedited(run_dir, spec, saved)
    return _executed_as(spec, given)


def _executed_as(spec: RunSpec, given: Mapping[str, Any]) -> RunSpec:
    """``spec`` with the execution keys ``given`` sets away from their defaults (:data:`EXECUTION_KEYS`)."""
    top = defaults_of("")
    changed: dict[str, Any] = {}
    for key in ("placement", "checkpoint_every"):
        if key in given and given[key] != top[key]:
            changed[key] = check_group("", {key: given[key]}, {key: TOP[key]})[key]
    local = defaults_of("cluster")
    cluster = {k: v for k, v in (given.get("cluster") or {}).items() if v != local.get(k)}
    engine = {k: v for k, v in (given.get("engine") or {}).items()
              if f"engine.{k}" in EXECUTION_KEYS and v != top["engine"].get(k)}
    if engine:
        typed = _engine({**top["engine"], **engine})
        changed["engine"] = replace(spec.engine, **{k: getattr(typed, k) for k in engine})
    if cluster:
        changed["cluster"] = check_group("cluster", {**spec.cluster, **cluster}, CLUSTER)
        check_address(changed["cluster"].get("address"))
    if not changed:
        return spec
    said = [f"{k}={v}" for k, v in changed.items() if k in ("placement", "checkpoint_every")]
    said += [f"engine.{k}={v}" for k, v in engine.items()] + [f"cluster.{k}={v}" for k, v in cluster.items()]
    log.info("resuming %s with %s (how it runs, not what it computes)", spec.run_id, ", ".join(said))
    return replace(spec, **changed)


def defaults_of(group: str) -> dict[str, Any]:
    """conf/config.yaml's top level (``group=""``), or a config group's default option (``cluster``: local.yaml)."""
    import yaml

    path = CONFIG if not group else CONFIG.parent / group / "local.yaml"
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _check_unedited(run_dir: str, spec: RunSpec, saved: Mapping[str, Any]) -> None:
    """Refuse a resume whose config.yaml no longer makes the run id its status.json records (it was edited)."""
    from sim.core import checkpoint, rundir

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
        from sim.core.data import sites_from_table

        data = {**data, "partition": "natural"}
        stem = re.sub(r"[^\w.-]+", "_", Path(str(data.get("path") or "sites")).stem) or "sites"
        return from_sites(cfg, stem, sites_from_table(data)), {**c, "data": data}
    return build_scenario(cfg, seed), c


def spread_warning(spec: RunSpec) -> None:
    """Warn that a user's table is spread over the built-in scenario's fictional institutions (allowed, rarely meant).

    Called once the table was read and found valid (:func:`sim.checks.load_spec`), so a refused table gets its one
    line alone."""
    scenario_cfg = spec.config.get("scenario") or {}
    if spec.data.get("name") in ("table", "text") and scenario_cfg.get("from_data") == "auto" \
            and spec.data.get("partition") != "natural" and spec.data.get("path"):
        warn_once(f"warning: data.path: the rows of {Path(str(spec.data['path'])).name} are spread over the "
                  f"{len(spec.scenario.institutions)} fictional institutions of scenario={spec.scenario.name}; to "
                  "make each site of the file an institution, set data.institution_column=COLUMN")


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """Log a warning once per process (the pre-run check and the run both load the spec)."""
    log.warning(message)


def _wrappers(c: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the scheme group without the keys of before the wrappers, the wrappers the run has: group -> config).

    A group wraps when its config names a ``_target_``; a config saved before the wrappers gets the
    groups its old scheme keys meant (:func:`sim.core.legacy.wrappers`)."""
    out = {}
    for group in schema.WRAPPERS:
        cfg = c.get(group) or {}
        if not isinstance(cfg, Mapping):
            raise ConfigError(group, f"expected a config group, got {cfg!r}; pick one with {group}=<name>")
        if "name" in cfg:  # absent from configs saved before the wrappers
            schema.check_value(f"{group}.name", cfg["name"], schema.Field("str"))
        if not cfg.get("_target_"):  # an option that wraps nothing takes no settings; the others' keys: by signature
            check_group(group, cfg, {"name": schema.Field("str")}, allowed=schema.HYDRA_KEYS)
        else:
            out[group] = {k: v for k, v in cfg.items() if k != "name"}  # the option's name labels it, builds nothing
    scheme, meant = legacy.wrappers(c["scheme"])
    return scheme, {**meant, **out}


def _group(c: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A config group that must be present."""
    g = c.get(name)
    if not g:
        raise ConfigError(name, f"missing config group; pick one with {name}=<name>")
    return g


def _scheme_name(scheme: Mapping[str, Any], schemes: Mapping[str, str]) -> str:
    """Registry name of the scheme the group's _target_ points at (``schemes``: class path -> registry name)."""
    target = scheme.get("_target_")
    if isinstance(target, str) and target in schemes:
        return schemes[target]
    raise ConfigError("scheme._target_", f"{target!r} is not a registered scheme; known: {', '.join(sorted(schemes.values()))}")


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
