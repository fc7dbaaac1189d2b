"""The config schema: every key of every group, its type and its range, checked before anything runs.

One declarative :class:`Field` per key. :func:`check_group` refuses unknown keys and
values of the wrong type or out of range with one :class:`~sim.core.types.ConfigError` naming
the key. Groups whose keys belong to a class (schemes, model factories) take their
fields from its signature, so adding a scheme or a model never needs a schema edit.
Upper bounds exist only where a value would otherwise exhaust memory or hang before
the first round; they are far above anything a laptop or a cluster run uses.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping

from sim.core.types import ConfigError, shown

MAX_INSTITUTIONS = 100_000  # a generated population is built in the driver before any check on its data
MAX_SAMPLES = 10_000_000  # synthetic samples: 10M x 60 float32 is already 2.4 GB
MAX_WIDTH = 65_536  # model widths and input dimensions
MAX_LAYERS = 64  # entries of a model's width list
MAX_THREADS = 1_024
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")


@dataclass(frozen=True)
class Field:
    """One config key: its kind, its range, whether null is allowed and which words it takes."""

    kind: str  # int | float | bool | str | ints (list of int) | strs (list of str) | list | group | any
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False  # high itself is not allowed
    choices: tuple[str, ...] = ()  # the only words a str takes (empty = any non-empty text)
    null: bool = False  # None (yaml null) allowed
    words: tuple[str, ...] = ()  # words a number key also takes, e.g. "auto"

    def describe(self) -> str:
        """What a valid value looks like, for the error message."""
        noun = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
                "ints": "a list of whole numbers", "strs": "a list of text", "list": "a list",
                "group": "a group of key: value pairs", "any": "a value"}[self.kind]
        if self.choices:
            noun = "one of " + ", ".join(self.choices)
        extra = [*(repr(w) for w in self.words), *(["null"] if self.null else [])]
        return " ".join(filter(None, [noun, self.range()])) + (f" (or {' or '.join(extra)})" if extra else "")

    def range(self) -> str:
        """The bounds as text: '>= 0', '> 0', 'in [0, 1]', ''."""
        lo = None if self.low is None else (f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        if self.high is None or self.high == math.inf:
            return lo or ""
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def admits(self, n: float) -> bool:
        """Whether the number ``n`` lies in range."""
        above = self.low is None or (n > self.low if self.low_open else n >= self.low)
        below = self.high is None or (n < self.high if self.high_open else n <= self.high)
        return above and below


def _number(v: Any) -> bool:
    """A real int or float (bools are not numbers in a config)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shown(v: Any) -> str:
    """A value as it goes into a one-line message (plain values, long ones cut)."""
    return shown(v)


def check_value(key: str, v: Any, f: Field) -> Any:
    """Return ``v`` if it fits ``f``; otherwise raise ConfigError naming ``key``."""
    if v is None and f.null or (isinstance(v, str) and v in f.words):
        return v
    bad = ConfigError(key, f"expected {f.describe()}, got {_shown(v)}")
    if f.kind in ("int", "float"):
        ok = isinstance(v, int) and not isinstance(v, bool) if f.kind == "int" else _number(v) and math.isfinite(v)
        if not ok:
            raise bad
        if not f.admits(v):
            raise bad if f.kind == "int" else ConfigError(key, f"must be {f.range()}, got {_shown(v)}")
    elif f.kind == "bool" and not isinstance(v, bool):
        raise bad
    elif f.kind == "str":
        if not isinstance(v, str) or not v:
            raise bad
        if f.choices and v not in f.choices:
            noun = key.rpartition(".")[2].replace("_", " ")
            raise ConfigError(key, f"unknown {noun} {_shown(v)}; choose one of {', '.join(f.choices)}")
    elif f.kind in ("ints", "strs", "list"):
        if not isinstance(v, (list, tuple)) or (f.kind != "list" and not 1 <= len(v) <= MAX_LAYERS):
            raise bad
        item = Field("int" if f.kind == "ints" else "str", f.low, f.high, f.low_open, f.high_open)
        for i, x in enumerate(v if f.kind != "list" else ()):
            check_value(f"{key}[{i}]", x, item)
    elif f.kind == "group" and not isinstance(v, Mapping):
        raise bad
    return v


def check_group(prefix: str, cfg: Any, fields: Mapping[str, Field], *, allowed: tuple[str, ...] = ()) -> Mapping:
    """Check every key of one group: unknown keys and bad values are refused naming ``prefix.key``."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(prefix, f"expected a group of key: value pairs, got {_shown(cfg)}")
    for key in cfg:
        name = f"{prefix}.{key}" if prefix else str(key)
        if key in fields:
            check_value(name, cfg[key], fields[key])
        elif key not in allowed:
            raise ConfigError(name, f"unknown key; {prefix or 'the config'} takes {', '.join(sorted(fields))}")
    return cfg


def signature_fields(factory: Any, count: Field, skip: tuple[str, ...] = ()) -> dict[str, Field] | None:
    """Fields from a class's or function's keyword defaults; ``count`` types int and int-list ones (None: **kwargs).

    A class whose ``__init__`` passes ``**kwargs`` on to its base's (a variant of FedAvg, say) takes the base's
    keywords too, the subclass's defaults first; a function taking ``**kwargs`` judges its own keys (None)."""
    try:
        params = dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # no introspectable signature (a builtin): the factory judges
        return None
    if isinstance(factory, type):
        for base in factory.__mro__[1:]:
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                break
            if "__init__" in vars(base) and base is not object:
                params = {k: v for k, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
                inherited = inspect.signature(base.__init__).parameters
                params |= {k: v for k, v in inherited.items() if k not in params and k != "self"
                           and v.kind is not inspect.Parameter.VAR_POSITIONAL}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    out = {}
    for name, p in params.items():
        d = p.default
        if name in skip or name == "self" or p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if isinstance(d, bool):
            out[name] = Field("bool")
        elif isinstance(d, int):
            out[name] = count
        elif isinstance(d, float):
            out[name] = Field("float")
        elif isinstance(d, str):
            out[name] = Field("str")
        elif isinstance(d, (list, tuple)):
            out[name] = Field("ints", count.low, count.high)
        else:  # no default or None: no type to go by, the factory judges the value
            out[name] = Field("any")
    return out


def check_by_signature(prefix: str, cfg: Mapping, factory: Any, count: Field) -> None:
    """Check a group whose keys are ``factory``'s keyword arguments (plus Hydra's own keys)."""
    fields = signature_fields(factory, count, skip=("input_shape", "num_classes", "inner"))  # inner: what a wrapper wraps
    if fields is not None:  # a factory taking **kwargs is the judge of its own keys
        check_group(prefix, cfg, fields, allowed=HYDRA_KEYS)


# --- The groups. Enumerations live here so config.py and scenario.py share one list. ---

PLACEMENTS = ("auto", "dedicated", "pooled")
GPU_POLICIES = ("warn", "require")
BEHAVIOURS = ("honest", "free_rider", "noisy_labels", "sign_flip", "scaled", "data_poisoning")  # agents/behaviours.py
DATASETS = ("synthetic", "digits", "table", "text", "docstrings")  # sim.core.data.DATASETS; a test keeps the two in step
PARTITIONS = ("iid", "dirichlet", "quantity", "natural")  # sim.core.data.partition.PARTITIONS, likewise
WRAPPERS = ("aggregator", "secagg", "privacy", "compression")
"""Groups of the features that wrap a scheme (agents/wrappers), innermost first: the one order they compose in."""
GROUPS = ("scenario", "scheme", "model", "data", "training", "engine", "cluster", "results", "costs", *WRAPPERS)
OTHER_ENTRY_POINTS = ("hydra", "sweep", "schemes", "report", "seeds", "variants", "parts", "tune", "sweep_trust",
                      "tracking")  # keys of Hydra, sim.sweep, sim.compare and the commands' tracking (sim.tracking checks it)

PROBABILITY = Field("float", 0.0, 1.0)
SCHEDULES = ("constant", "cosine", "step")  # learning rate over rounds (sim.core.train.scheduled)
TOP = {
    "seed": Field("int", 0, 2**32 - 1),  # numpy and torch seeds both take 32 bits
    "rounds": Field("int", 1),
    "placement": Field("str", choices=PLACEMENTS),
    "smoke": Field("bool"),
    "checkpoint_every": Field("int", 0),
    "overwrite": Field("bool"),  # a new run may replace what an earlier one left in its directory
    # A run directory to continue. sim.sweep's config (conf/sweep_main.yaml) reuses the key as a
    # true/false flag for the sweep itself, so booleans mean "not a run directory" here.
    "resume": Field("any"),
    **{g: Field("group", null=g in ("training", "engine", "cluster", "results", "costs", *WRAPPERS)) for g in GROUPS},
}
TRAINING = {
    "local_epochs": Field("int", 1),
    "batch_size": Field("int", 1),
    "lr": Field("float", 0.0, low_open=True),
    "momentum": Field("float", 0.0, 1.0, high_open=True),
    "weight_decay": Field("float", 0.0),
    "optimizer": Field("str", choices=("sgd", "adamw")),
    "head_lr": Field("float", 0.0, low_open=True, null=True),
    "precision": Field("str", choices=("fp32", "bf16", "fp16")),
    "schedule": Field("str", choices=SCHEDULES),
    "server_schedule": Field("str", choices=SCHEDULES),
    "step_every": Field("int", 1),
    "step_gamma": Field("float", 0.0, 1.0, low_open=True),
}
RESULTS = {
    "select": Field("str", choices=("last", "best_val")),
}
ENGINE = {
    "threads_per_institution": Field("int", 1, MAX_THREADS),
    "coordinator_cpus": Field("float", 0.0),
    "pooled_hosts": Field("int", 1, null=True, words=("auto",)),
    "max_dedicated": Field("int", 0),
    "gpu_policy": Field("str", choices=GPU_POLICIES),
    "round_timeout_s": Field("float", 0.0, low_open=True),
    "round_deadline_s": Field("float", 0.0, low_open=True, null=True),  # simulated seconds a round waits (sim/core/stragglers.py)
    "backend": Field("str", choices=("ray", "inprocess")),
    "eval_every": Field("int", 1),
    "eval_scope": Field("str", choices=("all", "cohort")),
    "vectorise": Field("bool"),
}
CLUSTER = {
    "address": Field("str", null=True),
    "num_cpus": Field("int", 1, null=True),
    "num_gpus": Field("int", 0, null=True),
    "temp_dir": Field("str", null=True),
    "connect_timeout_s": Field("float", 0.0, 3600.0, low_open=True),  # joining cluster.address gives up after this
    "dashboard": Field("bool"),  # a local cluster's Ray dashboard (off unless asked)
}
SCENARIO = {
    "name": Field("str"),
    "num_institutions": Field("int", 1, MAX_INSTITUTIONS, null=True),
    "disciplines": Field("strs", null=True),
    "label_skew": Field("float", 0.0, low_open=True, null=True),
    "quantity_skew": Field("float", 0.0),
    "cpus": Field("float", 0.0),
    "gpus": Field("float", 0.0),
    "institutions": Field("list", null=True),
    "availability": PROBABILITY,
    "failure_rate": PROBABILITY,
    "speed": Field("float", 0.0, low_open=True),  # compute speed factor on top of cpus/gpus (sim/core/clock.py); each row may set its own
    "straggler_share": PROBABILITY,  # probability an institution is slowed in a round (sim/core/stragglers.py)
    "slowdown": Field("list", null=True),  # [low, high]: a slowed institution computes U[low, high] times longer
    "speed_trace": Field("str", null=True),  # CSV of institution, round, speed and/or available (FedScale-style trace)
    "from_data": Field("bool", words=("auto",)),  # true | false | auto: institutions are the sites of data=table/text (sim.core.scenario)
    "behaviours": Field("group", null=True),  # generated populations: behaviour -> share of the institutions (sim.core.scenario)
}
INSTITUTION = {
    "name": Field("str"),  # its name: the results' institution column; rows are kept in this order
    "discipline": Field("str", null=True),  # its discipline (null: general); disciplines differ more than institutions within one
    "share": Field("float", 0.0, low_open=True),  # above 1 the shares cannot sum to 1, which is checked next
    "label_skew": Field("float", 0.0, low_open=True, null=True),
    "feature_skew": Field("float", 0.0),
    "cpus": Field("float", 0.0),
    "gpus": Field("float", 0.0),
    "behaviour": Field("str", choices=BEHAVIOURS),  # honest, or a simulated misbehaviour (agents/behaviours.py, sim/core/data/corruption.py)
    "bandwidth_mbps": Field("float", 0.0, low_open=True),
    "latency_s": Field("float", 0.0),
    "speed": Field("float", 0.0, low_open=True),
    "availability": PROBABILITY,
    "failure_rate": PROBABILITY,
    "model": Field("str", null=True),  # its own architecture: a conf/model/<name>.yaml (null: the run's model)
}
BEHAVIOUR_SETTINGS = {
    "behaviour_noise": Field("float", 0.0),  # free_rider: std of the Gaussian noise on the model it sends back
    "label_noise": PROBABILITY,  # noisy_labels: fraction of its training labels flipped to another class
    "scale": Field("float", 0.0, low_open=True),  # sign_flip / scaled: multiple of its change it sends (1 / 10)
    "poison_fraction": PROBABILITY,  # data_poisoning: fraction of its training rows given the trigger
    "trigger_features": Field("int", 1, MAX_WIDTH),  # data_poisoning: how many leading input elements the trigger sets
    "trigger_value": Field("float"),  # data_poisoning: the value they are set to
    "target_label": Field("int", 0),  # data_poisoning: the label triggered rows are given
}
"""Settings of a behaviour, on an institution row or (as defaults for every row) on the scenario."""
BEHAVIOUR_KEYS = {
    "free_rider": ("behaviour_noise",),
    "noisy_labels": ("label_noise",),
    "sign_flip": ("scale",),
    "scaled": ("scale",),
    "data_poisoning": ("poison_fraction", "trigger_features", "trigger_value", "target_label"),
}
"""Which settings each behaviour takes; a row that sets another behaviour's setting is refused."""
SCENARIO.update({k: Field(f.kind, f.low, f.high, f.low_open, f.high_open, null=True) for k, f in BEHAVIOUR_SETTINGS.items()})
INSTITUTION.update(BEHAVIOUR_SETTINGS)
DP_SETTINGS = {
    "dp_noise_multiplier": Field("float", 0.0, low_open=True),  # DP-SGD: Gaussian noise std over the clipping norm
    "dp_clip_norm": Field("float", 0.0, low_open=True),  # DP-SGD: L2 bound on each sample's gradient
    "dp_delta": Field("float", 0.0, 1.0, low_open=True, high_open=True),  # DP-SGD: delta of the reported epsilon
}
"""Sample-level DP-SGD of an institution's local step (sim.core.dp_sgd), on a row or (for every row) on the scenario."""
SCENARIO.update({k: Field(f.kind, f.low, f.high, f.low_open, f.high_open, null=True) for k, f in DP_SETTINGS.items()})
INSTITUTION.update(DP_SETTINGS)
_PARTITION = {"dirichlet_alpha": Field("float", 0.0, low_open=True), "quantity_exponent": Field("float", 0.0)}
_TEXT = {"max_length": Field("int", 2, 512), "max_rows_per_institution": Field("int", 1, null=True)}
_COMMON = {"name": Field("str", choices=DATASETS), "partition": Field("str", choices=PARTITIONS),
           "test_fraction": Field("float", 0.0, 1.0, low_open=True, high_open=True),
           "val_fraction": Field("float", 0.0, 1.0, high_open=True),
           "public": Field("group", null=True)}  # unlabeled public set for distillation (sim.core.data.public)
_VIEWS = {"views": Field("group", null=True), "label_holder": Field("str", null=True),  # sim.core.data.views
          "overlap": Field("float", 0.0, 1.0, low_open=True)}
DATA = {
    "synthetic": {**_COMMON, "num_samples": Field("int", 1, MAX_SAMPLES), "dim": Field("int", 1, MAX_WIDTH),
                  "num_classes": Field("int", 2, MAX_WIDTH), "alpha": Field("float", 0.0), "beta": Field("float", 0.0),
                  "within": PROBABILITY, "between": PROBABILITY},
    "digits": {**_COMMON, **_PARTITION},
    "table": {**_COMMON, **_PARTITION, "path": Field("str", null=True), "label_column": Field("str"),
              "institution_column": Field("str", null=True), "discipline_column": Field("str", null=True),
              "split_column": Field("str", null=True), "feature_columns": Field("strs", null=True),
              **_VIEWS, "entity_column": Field("str", null=True)},
    "text": {**_COMMON, **_PARTITION, **_TEXT, "path": Field("str", null=True), "text_column": Field("str"),
             "label_column": Field("str"), "institution_column": Field("str", null=True),
             "split_column": Field("str", null=True)},
    "docstrings": {**_COMMON, **_PARTITION, **_TEXT,
                   "task": Field("str", choices=("subpackage", "discipline", "kind")),
                   "min_class_rows": Field("int", 1), "cache_dir": Field("str"),
                   "size_exponent": Field("float", 0.0, 1.0, null=True), **_VIEWS},
}
"""Per dataset (the yaml files of conf/data/): every key sim.core.data's DEFAULTS know, typed."""


def check_data_types(data: Mapping) -> None:
    """Types and ranges of the data group; sim.core.data.check_data then checks it against the scenario."""
    check_value("data.name", data.get("name"), Field("str", choices=DATASETS))
    check_group("data", data, DATA[data["name"]], allowed=HYDRA_KEYS)


PRICES = {
    "cpu_hour": Field("float", 0.0),  # money per CPU-core-hour
    "gpu_hour": Field("float", 0.0),  # money per GPU-hour
    "gb": Field("float", 0.0),  # money per GB (1e9 bytes) sent or received
    "cpu_watts": Field("float", 0.0, null=True),  # power of one busy core (null: no energy figures)
    "gpu_watts": Field("float", 0.0, null=True),  # power of one busy GPU
    "kwh": Field("float", 0.0),  # money per kWh, on top of the device prices
    "co2_per_kwh": Field("float", 0.0, null=True),  # kg CO2e per kWh (null: no emissions figures)
}
"""Prices of the cost model (conf/costs/, analysis/costs.py), consortium-wide or per institution."""
COSTS = {"currency": Field("str"), **PRICES, "scale": Field("float", 0.0, low_open=True),
         "institutions": Field("group", null=True)}


def check_costs(costs: Mapping | None, names: tuple[str, ...] | list[str]) -> Mapping:
    """The costs group, checked: prices >= 0 and finite, no unknown key, overrides only for the scenario's institutions."""
    if costs is None:
        return {}
    check_group("costs", costs, COSTS)
    overrides = costs.get("institutions") or {}
    known = set(names)
    for name, prices in overrides.items():
        if name not in known:
            shown = ", ".join(list(names)[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"costs.institutions.{name}", f"unknown institution {_shown(name)}; the scenario has {shown}")
        check_group(f"costs.institutions.{name}", prices, PRICES)
    return costs
