"""From a Hydra config to a validated, frozen :class:`RunSpec`.

Everything a user can get wrong is checked here, before Ray starts, and reported as a
:class:`~sim.types.ConfigError` naming the key. Code below this point receives typed
objects, never raw dicts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from sim.scenario import build_scenario
from sim.types import ConfigError, Scenario, TrainingSpec

PLACEMENTS = ("auto", "dedicated", "pooled")
GPU_POLICIES = ("warn", "require")
SMOKE_ROUNDS = 3


@dataclass(frozen=True)
class EngineSpec:
    """How the simulation is laid out on the cluster."""

    threads_per_institution: int = 1
    coordinator_cpus: float = 0.25
    pooled_hosts: int | None = None  # None = as many as the CPUs allow
    max_dedicated: int = 16
    gpu_policy: str = "warn"


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
    c = {k: v for k, v in c.items() if k != "hydra"}
    seed = _int(c, "seed", minimum=0)
    smoke = bool(c.get("smoke", False))
    rounds = _int(c, "rounds", minimum=1)
    if smoke:
        rounds = min(rounds, SMOKE_ROUNDS)
    placement = c.get("placement", "auto")
    if placement not in PLACEMENTS:
        raise ConfigError("placement", f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    scenario = build_scenario(c.get("scenario") or {}, seed)
    scheme_name = _scheme_name(c.get("scheme") or {})
    spec = RunSpec(
        seed=seed,
        rounds=rounds,
        placement=placement,
        scenario=scenario,
        scheme_name=scheme_name,
        scheme=c["scheme"],
        model=_group(c, "model"),
        data=_group(c, "data"),
        training=_training(c.get("training") or {}),
        engine=_engine(c.get("engine") or {}),
        cluster=c.get("cluster") or {},
        smoke=smoke,
        config_hash=hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:8],
    )
    _check_groups(spec)
    return spec


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
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from sim.data import check_data
    from sim.models import build_model

    try:
        instantiate(dict(spec.scheme))
    except (InstantiationException, TypeError, ValueError) as e:
        raise ConfigError("scheme", _first_line(e)) from None
    check_data(spec.data, spec.scenario)
    # Shapes are checked for real when the data is built; a small probe catches bad model keys now.
    build_model(spec.model, (1, 8, 8) if spec.model.get("_target_", "").endswith("cnn") else (4,), 2, seed=0)


def _first_line(e: BaseException) -> str:
    """The most specific line of a (possibly chained) exception."""
    inner = e.__cause__ or e
    return str(inner).strip().splitlines()[-1] if str(inner).strip() else type(inner).__name__


def _training(t: Mapping[str, Any]) -> TrainingSpec:
    """Local-training hyperparameters, range-checked."""
    allowed = set(TrainingSpec.__dataclass_fields__)
    for k in t:
        if k not in allowed:
            raise ConfigError(f"training.{k}", f"unknown key; training takes {', '.join(sorted(allowed))}")
    spec = TrainingSpec(
        local_epochs=_int(t, "local_epochs", minimum=1, prefix="training.", default=1),
        batch_size=_int(t, "batch_size", minimum=1, prefix="training.", default=32),
        lr=_float(t, "lr", "training.", default=0.05, positive=True),
        momentum=_float(t, "momentum", "training.", default=0.0),
        weight_decay=_float(t, "weight_decay", "training.", default=0.0),
    )
    if spec.momentum >= 1:
        raise ConfigError("training.momentum", f"must be in [0, 1), got {spec.momentum}")
    return spec


def _engine(e: Mapping[str, Any]) -> EngineSpec:
    """Engine layout settings, range-checked."""
    allowed = set(EngineSpec.__dataclass_fields__)
    for k in e:
        if k not in allowed:
            raise ConfigError(f"engine.{k}", f"unknown key; engine takes {', '.join(sorted(allowed))}")
    hosts = e.get("pooled_hosts", "auto")
    policy = e.get("gpu_policy", "warn")
    if policy not in GPU_POLICIES:
        raise ConfigError("engine.gpu_policy", f"unknown policy {policy!r}; choose warn or require")
    return EngineSpec(
        threads_per_institution=_int(e, "threads_per_institution", minimum=1, prefix="engine.", default=1),
        coordinator_cpus=_float(e, "coordinator_cpus", "engine.", default=0.25),
        pooled_hosts=None if hosts in (None, "auto") else _int(e, "pooled_hosts", minimum=1, prefix="engine."),
        max_dedicated=_int(e, "max_dedicated", minimum=0, prefix="engine.", default=16),
        gpu_policy=policy,
    )


def _int(c: Mapping[str, Any], key: str, *, minimum: int, prefix: str = "", default: int | None = None) -> int:
    """An integer config value >= minimum."""
    v = c.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(prefix + key, f"expected a whole number >= {minimum}, got {v!r}")
    return v


def _float(c: Mapping[str, Any], key: str, prefix: str, *, default: float, positive: bool = False) -> float:
    """A non-negative (or positive) number."""
    v = c.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
        raise ConfigError(prefix + key, f"expected a number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)
