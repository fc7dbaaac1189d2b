"""Sweep files (``conf/sweep/``) into checked sweep specs, Ray Tune param spaces and Hydra overrides.

A sweep file maps any run-config key (``scheme``, ``scheme.mu``, ``training.lr``,
``data.dirichlet_alpha``, ...) to a search-space spec. Everything here is pure Python
and runs before Ray starts, so a bad sweep file fails with one line naming the key;
:func:`param_space` alone touches Ray Tune, and imports it when called.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from sim.core.types import ConfigError, listing
from sim.sweep.design import DESIGN_ROW, MIN_BASE, check_base, points, require_salib, sobol_design

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
"""Search-space specs: ``{grid: [..]}`` (every value), ``{choice: [..]}`` (sampled), ``{uniform|loguniform|randint: [lo, hi]}``."""
CATEGORICAL = ("grid", "choice")
SEARCHES = ("grid", "random", "optuna", "sobol")
SCHEDULERS = ("asha",)
METRICS = ("global_accuracy", "global_loss", "mean_accuracy", "worst_accuracy")
"""What the engine reports each round (sim.engine's on_round summary), so what a sweep can optimise."""
MODES = ("max", "min")
BUNDLES = ("merged", "per_host")
BACKENDS = ("inprocess", "ray")
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
SMOKE_KEEP = 2  # smoke=true keeps this many values of each categorical dimension, seeds and samples
INDEX = "__trial_index__"  # Tune's Repeater numbers the repeats of one configuration with this key
VARIANT = "variant"  # the dimension whose values are sweep.variants: each a named list of overrides
SAMPLE = "sample"  # random or sobol search: the drawn values of one configuration, a grid entry in Tune's param space


@dataclass(frozen=True)
class Dimension:
    """One swept config key: its kind and its values (grid/choice) or bounds (lo, hi)."""

    key: str
    kind: str
    values: tuple

    @property
    def categorical(self) -> bool:
        """True when the values are listed (grid or choice), False for ranges."""
        return self.kind in CATEGORICAL


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: what varies, how it is searched, and what each trial may reserve."""

    name: str
    dimensions: tuple[Dimension, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # fixed run-config overrides for every trial
    search: str
    num_samples: int
    scheduler: str | None
    grace_period: int
    reduction_factor: int
    metric: str
    mode: str
    max_concurrent: int | None
    trial_cpus: float | None  # None = a trial may reserve the whole cluster
    driver_cpus: float  # the trial's own process: data, the round loop
    bundles: str
    bundle_strategy: str
    backend: str = "inprocess"  # inprocess: the trial's own (reused) process runs the simulation | ray: the trial starts actors
    tune_verbose: bool = False  # true: Tune's own progress tables on the console, instead of one line per finished trial
    variants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # value of the ``variant`` dimension -> its overrides
    max_trials: int = 1000  # more trials are refused unless this is raised: a typo in a space should not start 30,000
    trial_seconds: float = 60.0  # rough wall seconds of one trial, for the estimate printed before the sweep starts

    @property
    def keys(self) -> tuple[str, ...]:
        """The swept config keys, in file order (seed not included)."""
        return tuple(d.key for d in self.dimensions)

    @property
    def samples(self) -> int:
        """Tune's num_samples: a model-based search runs each configuration it proposes once per seed;
        grid and random search list every trial in the param space (random draws included), so once."""
        return self.num_samples * len(self.seeds) if self.search == "optuna" else 1

    @property
    def drawn(self) -> tuple[Dimension, ...]:
        """The dimensions random search draws values for, or a Sobol' design's levers (everything but grids)."""
        return tuple(d for d in self.dimensions if d.kind != "grid") if self.search in ("random", "sobol") else ()

    @property
    def design_points(self) -> int:
        """Configurations of the drawn dimensions: num_samples draws, or a Sobol' design's N x (levers + 2) points."""
        if self.search == "sobol":
            return points(self.num_samples, len(self.drawn))
        return self.num_samples

    def trial_count(self) -> int:
        """How many trials the sweep runs."""
        if self.search == "optuna":
            return self.samples
        grid = math.prod(len(d.values) for d in self.dimensions if d.kind == "grid")
        return grid * (self.design_points if self.drawn else 1) * len(self.seeds)


def load_sweep(cfg: Mapping[str, Any], *, smoke: bool = False) -> SweepSpec:
    """Check the ``sweep`` group and freeze it (raises ConfigError naming ``sweep.<key>``); smoke shrinks it."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True)  # plain lists and dicts, whatever came in
    known = set(SweepSpec.__dataclass_fields__) - {"dimensions"} | {"space"}
    for key in cfg:
        if key not in known:
            raise ConfigError(f"sweep.{key}", f"unknown key; a sweep takes {', '.join(sorted(known))}")
    variants = expand_variants(cfg.get("variants"))
    space = dict(cfg.get("space") or {})
    if variants and VARIANT not in space:
        space = {VARIANT: {"grid": list(variants)}, **space}  # every variant, crossed with the rest of the space
    dims = dimensions(space)
    if VARIANT in (d.key for d in dims):
        listed = next(d for d in dims if d.key == VARIANT)
        wrong = [v for v in listed.values if v not in variants]
        if wrong:
            raise ConfigError(f"sweep.space.{VARIANT}", f"{listing(map(repr, wrong))} {'is' if len(wrong) == 1 else 'are'} not a variant of sweep.variants"
                              + (f" ({', '.join(variants)})" if variants else "; define them there"))
    search = _word(cfg, "search", SEARCHES, "grid")
    scheduler = cfg.get("scheduler")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ConfigError("sweep.scheduler", f"unknown scheduler {scheduler!r}; choose null or {', '.join(SCHEDULERS)}")
    if search == "grid":
        drawn = next((d for d in dims if d.kind != "grid"), None)
        if drawn is not None:
            raise ConfigError(f"sweep.space.{drawn.key}", f"{drawn.kind} needs search=random or optuna (or sobol, "
                              "a sensitivity design) (grid search lists every value: use {grid: [..]})")
    seeds = cfg.get("seeds")
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(_whole(s) and s >= 0 for s in seeds):
        raise ConfigError("sweep.seeds", f"expected a non-empty list of whole numbers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("sweep.seeds", f"seeds repeat: {list(seeds)}")
    overrides = cfg.get("overrides") or []
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError("sweep.overrides", f"expected a list of Hydra overrides like 'data=digits', got {overrides!r}")
    spec = SweepSpec(
        name=str(cfg.get("name") or "sweep"),
        dimensions=dims,
        seeds=tuple(int(s) for s in seeds),
        overrides=tuple(overrides),
        search=search,
        num_samples=_count(cfg, "num_samples", 1),
        scheduler=scheduler,
        grace_period=_count(cfg, "grace_period", 1),
        reduction_factor=_count(cfg, "reduction_factor", 3, minimum=2),
        metric=_word(cfg, "metric", METRICS, "global_accuracy"),
        mode=_word(cfg, "mode", MODES, "max"),
        max_concurrent=None if cfg.get("max_concurrent") is None else _count(cfg, "max_concurrent", 1),
        trial_cpus=None if cfg.get("trial_cpus") is None else _cpus(cfg, "trial_cpus", 1.0, positive=True),
        driver_cpus=_cpus(cfg, "driver_cpus", 0.05),
        bundles=_word(cfg, "bundles", BUNDLES, "merged"),
        bundle_strategy=_word(cfg, "bundle_strategy", STRATEGIES, "STRICT_PACK"),
        backend=_word(cfg, "backend", BACKENDS, "inprocess"),
        tune_verbose=_flag(cfg, "tune_verbose", False),
        variants=variants,
        max_trials=_count(cfg, "max_trials", 1000),
        trial_seconds=_cpus(cfg, "trial_seconds", 60.0, positive=True),
    )
    if spec.trial_cpus is not None and spec.trial_cpus <= spec.driver_cpus:
        raise ConfigError("sweep.trial_cpus", f"{spec.trial_cpus:g} leaves nothing for the simulation after "
                          f"sweep.driver_cpus={spec.driver_cpus:g}; raise it")
    if search == "sobol":
        _check_levers(spec)
    spec = shrink(spec) if smoke else spec
    trials = spec.trial_count()
    if trials > spec.max_trials:
        raise ConfigError("sweep.max_trials", f"the sweep has {trials:,} trials, more than sweep.max_trials="
                          f"{spec.max_trials:,}: about {duration(trials * spec.trial_seconds)} of trial time at "
                          f"sweep.trial_seconds={spec.trial_seconds:g} each; shrink sweep.space or seeds, or pass "
                          f"sweep.max_trials={trials} to run them all")
    return spec


def _check_levers(spec: SweepSpec) -> None:
    """A Sobol' design samples ranges: a choice has none (grids are crossed with every point), and its base must do."""
    for d in spec.dimensions:
        if d.kind == "choice":
            raise ConfigError(f"sweep.space.{d.key}", "search=sobol samples levers from ranges and a choice has "
                              "none; give {uniform|loguniform|randint: [lo, hi]}, or {grid: [..]} to run every value "
                              "at every design point")
    check_base(spec.num_samples, len(spec.drawn))
    require_salib()


def duration(seconds: float) -> str:
    """A length of time as a person would say it: '45 s', '12 min', '3.4 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def expand_variants(cfg: Any) -> dict[str, tuple[str, ...]]:
    """``sweep.variants`` as ``{value: overrides}``: what the ``variant`` dimension's values set.

    A variant is ``LABEL: [overrides]``, or ``LABEL: {overrides: [..], grid: {key: [values]}}``,
    which makes one value per combination of its own grid, ``LABEL[key=value,...]``: a scheme
    crossed with a key only that scheme has (``dp_fedavg`` over ``scheme.target_epsilon``)
    while the other variants run once. Results carry LABEL in their ``scheme`` column.
    """
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping) or not cfg:
        raise ConfigError("sweep.variants", f"expected LABEL: [overrides] entries, got {cfg!r}")
    out: dict[str, tuple[str, ...]] = {}
    for label, body in cfg.items():
        where = f"sweep.variants.{label}"
        if not re.fullmatch(r"[A-Za-z_][\w\-]*", str(label)):
            raise ConfigError(where, "a label is a word (letters, digits, _ or -), as it names the results' scheme column")
        grid: Mapping = {}
        if isinstance(body, Mapping):
            unknown = set(body) - {"overrides", "grid"}
            if unknown:
                raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key; a variant takes overrides and grid")
            grid, body = body.get("grid") or {}, body.get("overrides")
        if not isinstance(body, (list, tuple)) or not body or not all(isinstance(o, str) and "=" in o for o in body):
            raise ConfigError(where, f"expected a list of overrides like scheme=fedavg, got {body!r}")
        if not isinstance(grid, Mapping):
            raise ConfigError(f"{where}.grid", f"expected {{key: [values]}}, got {grid!r}")
        try:
            axes = [_dimension(str(k), v if isinstance(v, Mapping) else {"grid": v}) for k, v in grid.items()]
        except ConfigError as e:
            raise ConfigError(f"{where}.grid.{e.key.removeprefix('sweep.space.')}", e.problem) from None
        if any(d.kind != "grid" for d in axes):
            raise ConfigError(f"{where}.grid", "a variant's own values are a grid: {key: [values]}")
        for combo in itertools.product(*[d.values for d in axes]):
            own = [f"{d.key}={override_value(v)}" for d, v in zip(axes, combo)]
            name = f"{label}[{','.join(own)}]" if own else str(label)
            out[name] = (*body, *own)
    return out


def variant_label(value: str) -> str:
    """The label a variant's results carry: ``dp_fedavg[scheme.target_epsilon=1.0]`` -> ``dp_fedavg``."""
    return value.split("[", 1)[0]


def dimensions(space: Any) -> tuple[Dimension, ...]:
    """Parse a ``space`` mapping (dotted keys, or nested groups of them) into dimensions."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("sweep.space", "empty; map at least one config key to a spec, e.g. scheme: {grid: [fedavg, fedprox]}")
    dims: list[Dimension] = []
    for key, spec in _flatten(space):
        if key == "seed":
            raise ConfigError("sweep.space.seed", "seeds are replications: list them under sweep.seeds instead")
        dims.append(_dimension(key, spec))
    return tuple(dims)


def _flatten(space: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, spec) pairs; a mapping that is not a spec is a level of nesting (``training: {lr: {..}}``)."""
    for key, spec in space.items():
        name = f"{prefix}{key}"
        if isinstance(spec, Mapping) and spec and not set(spec) & set(KINDS) and all(isinstance(v, Mapping) for v in spec.values()):
            yield from _flatten(spec, name + ".")
        else:
            yield name, spec


def _dimension(key: str, spec: Any) -> Dimension:
    """One dimension from ``{kind: values}`` (a bare list is shorthand for a grid)."""
    where = f"sweep.space.{key}"
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
        raise ConfigError(where, "not a config key; use dotted names like training.lr")
    if isinstance(spec, (list, tuple)):
        spec = {"grid": spec}
    if not isinstance(spec, Mapping) or len(spec) != 1:
        got = f"keys {', '.join(map(str, spec))}" if isinstance(spec, Mapping) else repr(spec)
        raise ConfigError(where, f"expected {{kind: [..]}} with kind one of {', '.join(KINDS)}; got {got}")
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise ConfigError(where, f"unknown search-space kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind in CATEGORICAL:
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(where, f"values repeat: {list(values)}")
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(_number(v) for v in values) or not values[0] < values[1]:
        raise ConfigError(where, f"{kind} needs [lo, hi] with lo < hi, got {list(values)}")
    if kind == "loguniform" and values[0] <= 0:
        raise ConfigError(where, f"loguniform needs lo > 0, got {values[0]}")
    if kind == "randint" and not all(_whole(v) for v in values):
        raise ConfigError(where, f"randint needs whole-number bounds, got {list(values)}")
    return Dimension(key, kind, tuple(values))


def shrink(spec: SweepSpec) -> SweepSpec:
    """The smoke version: the first values of each listed dimension, few seeds and samples, an early rung."""
    from dataclasses import replace

    dims = tuple(replace(d, values=d.values[:SMOKE_KEEP]) if d.categorical else d for d in spec.dimensions)
    fewest = MIN_BASE if spec.search == "sobol" else SMOKE_KEEP  # a Sobol' design's smallest base
    return replace(spec, dimensions=dims, seeds=spec.seeds[:SMOKE_KEEP], num_samples=min(spec.num_samples, fewest),
                   grace_period=1)


def param_space(spec: SweepSpec, seed: int = 0) -> dict[str, Any]:
    """Ray Tune's param space.

    Grid and random search: every grid dimension and ``seed`` is a grid; random search
    draws ``num_samples`` configurations of the other dimensions here (from ``seed``) and
    adds them as one more grid, so every seed replicates the same draws (Tune's own
    sampling would draw afresh for each seed). A model-based search (Optuna) gets Tune's
    domains; it cannot take grids, so they become categorical choices, and seeds are left
    to a Repeater that runs every proposed configuration once per seed (see sim.sweep).
    """
    from ray import tune

    if spec.search != "optuna":
        space = {d.key: tune.grid_search(list(d.values)) for d in spec.dimensions if d.kind == "grid"}
        if spec.drawn:
            space[SAMPLE] = tune.grid_search(draws(spec, seed))
        return space | {"seed": tune.grid_search(list(spec.seeds))}
    space: dict[str, Any] = {}
    for d in spec.dimensions:
        if d.categorical:
            space[d.key] = tune.choice(list(d.values))
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.values)
        else:  # randint: both bounds included, as a researcher reads [1, 5]; Tune's upper bound is exclusive
            space[d.key] = tune.randint(int(d.values[0]), int(d.values[1]) + 1)
    return space


def draws(spec: SweepSpec, seed: int) -> list[dict[str, Any]]:
    """``num_samples`` random configurations of the drawn dimensions (search=sobol: the points of a Sobol' design,
    :mod:`sim.sweep.design`), the same for the same seed."""
    import numpy as np

    if spec.search == "sobol":
        return sobol_design(spec.drawn, spec.num_samples, seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(spec.num_samples):
        config = {}
        for d in spec.drawn:
            lo, hi = d.values[0], d.values[-1]
            if d.categorical:
                config[d.key] = d.values[int(rng.integers(len(d.values)))]
            elif d.kind == "uniform":
                config[d.key] = float(rng.uniform(lo, hi))
            elif d.kind == "loguniform":
                config[d.key] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            else:  # randint: both bounds included
                config[d.key] = int(rng.integers(int(lo), int(hi) + 1))
        out.append(config)
    return out


def trial_values(spec: SweepSpec, config: Mapping[str, Any]) -> dict[str, Any]:
    """The swept values of one trial, and its seed, from Tune's trial config."""
    drawn = config.get(SAMPLE) or {}
    values = {d.key: _plain(drawn[d.key] if d.key in drawn else config[d.key]) for d in spec.dimensions}
    if DESIGN_ROW in drawn:  # a Sobol' point's place in its design: the analysis pairs rows by it
        values[DESIGN_ROW] = int(drawn[DESIGN_ROW])
    values["seed"] = int(config["seed"]) if "seed" in config else spec.seeds[int(config.get(INDEX, 0)) % len(spec.seeds)]
    return values


def trial_overrides(values: Mapping[str, Any], variants: Mapping[str, tuple[str, ...]] | None = None) -> list[str]:
    """Hydra overrides that set a trial's values (``scheme=fedprox``, ``scheme.mu=0.01``, ``seed=1``);
    a ``variant`` value stands for its overrides (``sweep.variants``)."""
    out: list[str] = []
    for k, v in values.items():
        if k == DESIGN_ROW:  # where the point sits in its design, not a config key
            continue
        out += list((variants or {})[v]) if k == VARIANT else [f"{k}={override_value(v)}"]
    return out


def override_value(v: Any) -> str:
    """A Python value written as Hydra's override grammar reads it back."""
    v = _plain(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(override_value(x) for x in v) + "]"
    text = str(v)
    if re.fullmatch(r"[A-Za-z_][\w\-/.]*", text) and text.lower() not in ("null", "true", "false", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_points(spec: SweepSpec) -> Iterator[dict[str, Any]]:
    """Trial values that together use every listed value and both ends of every range, for checking before Ray starts.

    The first point takes the first value of every dimension; each further point changes
    one dimension, so a key that only breaks with one value (``scheme.mu`` with fedavg)
    is still found, without composing the whole grid.
    """
    options = [list(d.values) for d in spec.dimensions]
    base = {d.key: o[0] for d, o in zip(spec.dimensions, options)}
    yield base | {"seed": spec.seeds[0]}
    for d, o in zip(spec.dimensions, options):
        for alt in o[1:]:
            yield base | {d.key: alt, "seed": spec.seeds[0]}


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid dimensions and seeds (what a grid search runs), for tests and counts."""
    grids = [d for d in spec.dimensions if d.kind == "grid"]
    return [dict(zip([d.key for d in grids] + ["seed"], combo))
            for combo in itertools.product(*[d.values for d in grids], spec.seeds)]


def _plain(v: Any) -> Any:
    """numpy scalars (what samplers hand back) as plain Python numbers."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, tuple, str)) else v


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def _word(cfg: Mapping, key: str, choices: tuple[str, ...], default: str) -> str:
    """A value out of a fixed list of words."""
    v = cfg.get(key, default)
    if v not in choices:
        raise ConfigError(f"sweep.{key}", f"unknown {key.replace('_', ' ')} {v!r}; choose one of {', '.join(choices)}")
    return v


def _flag(cfg: Mapping, key: str, default: bool) -> bool:
    """True or false."""
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"sweep.{key}", f"expected true or false, got {v!r}")
    return v


def _count(cfg: Mapping, key: str, default: int, minimum: int = 1) -> int:
    """A whole number >= minimum."""
    v = cfg.get(key, default)
    if not (isinstance(v, int) and not isinstance(v, bool)) or v < minimum:
        raise ConfigError(f"sweep.{key}", f"expected a whole number >= {minimum}, got {v!r}")
    return v


def _cpus(cfg: Mapping, key: str, default: float, positive: bool = False) -> float:
    """A CPU amount: >= 0, or > 0."""
    v = cfg.get(key, default)
    if not _number(v) or v < 0 or (positive and v == 0):
        raise ConfigError(f"sweep.{key}", f"expected a number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)
