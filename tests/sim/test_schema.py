"""Config validation: every key of every group has a schema; random bad configs get one clean line, never a traceback."""

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from sim.core import schema
from sim.cli import compose, guard
from sim.checks import load_spec
from sim.core.config import RunSpec
from sim.core.types import TrainingSpec, ConfigError

BASE = OmegaConf.to_container(compose("config", ["smoke=true", "data.num_samples=600"]), resolve=True)
BASE.pop("hydra", None)
WORDS = {  # keys that take only some words: any other text is a bad value
    "placement", "data.name", "data.partition", "engine.gpu_policy", "scheme.weighting", "scheme._target_",
    "model._target_", *(f"scenario.institutions[{i}].behaviour" for i in range(6)),
}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def leaves(node, path=()):
    """(path, value) of every leaf: dict keys and list positions of institution rows; other lists are leaves."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, k))
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, i))
    else:
        yield path, node


def dotted(path):
    """How an error names a path: scenario.institutions[0].share."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def replaced(path, value, base=BASE):
    """A deep copy of ``base`` with the leaf at ``path`` set to ``value``."""
    cfg = OmegaConf.to_container(OmegaConf.create(base))
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return cfg


LEAVES = [(p, v) for p, v in leaves(BASE) if v is not None and p[0] != "resume"]
GROUPS = [(), ("training",), ("engine",), ("cluster",), ("scenario",), ("scenario", "institutions", 0), ("scheme",),
          ("model",), ("data",)]
junk = st.one_of(st.text(max_size=8), st.integers(-10**12, 10**12), st.floats(allow_nan=True), st.booleans(),
                 st.none(), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def bad_for(path, base):
    """Values that are wrong for this key whatever the rest of the config: wrong type, out of range, unknown word."""
    key = dotted(path)
    other = st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(st.just("a"), st.integers(), min_size=1))
    if key == "scenario.from_data":  # true, false or "auto"
        return st.one_of(st.integers(), st.floats(), st.text(max_size=5).filter(lambda t: t != "auto"), other)
    if key == "engine.pooled_hosts":  # a whole number >= 1 or "auto"
        return st.one_of(st.integers(max_value=0), st.text(max_size=5).filter(lambda t: t != "auto"), other)
    if isinstance(base, bool):
        return st.one_of(st.text(max_size=5), st.integers(), st.floats(), other)
    if isinstance(base, int):
        return st.one_of(st.text(max_size=5), st.booleans(), st.integers(max_value=-1), other,
                         st.floats().filter(lambda f: not math.isfinite(f) or f != int(f)))
    if isinstance(base, float):  # every number in the config is >= 0, so negatives are always wrong
        return st.one_of(st.text(max_size=5), st.booleans(), st.floats(max_value=-1e-6), st.sampled_from([math.nan, math.inf]), other)
    if isinstance(base, str):
        wrong = st.one_of(st.integers(), st.floats(), st.booleans(), other)
        return st.one_of(wrong, st.text(alphabet="xyzq_", min_size=1, max_size=6)) if key in WORDS else wrong
    return st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.dictionaries(st.just("a"), st.integers(), min_size=1))


@st.composite
def bad_configs(draw):
    """A valid config with one leaf set to a value that is wrong for it; returns (config, the key that must be named)."""
    path, base = draw(st.sampled_from(LEAVES))
    return replaced(path, draw(bad_for(path, base))), dotted(path)


@SETTINGS
@given(bad_configs())
def test_any_bad_value_is_refused_naming_its_key(case):
    cfg, key = case
    with pytest.raises(ConfigError) as err:
        load_spec(cfg)
    assert err.value.key == key or err.value.key.startswith(key + "["), str(err.value)
    assert "\n" not in str(err.value)


@SETTINGS
@given(st.sampled_from(GROUPS), st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True))
def test_any_unknown_key_is_refused_naming_it(group, name):
    node = BASE
    for p in group:
        node = node[p]
    if name in node or (not group and name in schema.OTHER_ENTRY_POINTS):
        return
    cfg = replaced((*group, name), 1)
    with pytest.raises(ConfigError) as err:
        load_spec(cfg)
    assert err.value.key == dotted((*group, name)), str(err.value)


@SETTINGS
@given(st.sampled_from([p for p, _ in leaves(BASE)]), junk)
def test_any_value_anywhere_is_accepted_or_refused_in_one_line(path, value):
    try:
        spec = load_spec(replaced(path, value))
    except ConfigError as e:
        assert "\n" not in str(e) and e.key
    else:
        assert isinstance(spec, RunSpec)


@SETTINGS
@given(st.sampled_from([p for p, _ in leaves(BASE)]))
def test_any_key_left_out_is_defaulted_or_refused_in_one_line(path):
    cfg = replaced(path, None)
    node = cfg
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    try:
        load_spec(cfg)
    except ConfigError as e:
        assert "\n" not in str(e) and e.key


TOKENS = st.one_of(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), st.integers(-5, 10**6).map(str),
                   st.sampled_from(["-1.5", "nan", "inf", "null", "true", "[1,2]", "{a:1}", "'x y'", "1e400", "[]", ""]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([re.sub(r"\[(\d+)\]", r".\1", dotted(p)) for p, _ in leaves(BASE)] + ["scheme", "model", "data"]),
       value=TOKENS)
def test_the_command_line_refuses_random_overrides_in_one_line(key, value, capsys):
    try:
        guard("config", [f"{key}={value}"], load_spec)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err


@pytest.mark.parametrize("overrides, key", [
    (["cluster.num_cpus=0"], "cluster.num_cpus"),
    (["cluster.num_gpus=half"], "cluster.num_gpus"),
    (["cluster.address=3"], "cluster.address"),
    (["engine.round_timeout_s=0"], "engine.round_timeout_s"),
    (["checkpoint_every=-1"], "checkpoint_every"),
    (["seed=4294967296"], "seed"),
    (["smoke=yes"], "smoke"),
    (["model.hidden=[64,0]"], "model.hidden[1]"),
    (["scenario.num_institutions=1000000"], "scenario.num_institutions"),
    # Impossible resource requests are refused before Ray starts when the command names the cluster's size.
    (["cluster.num_cpus=1", "placement=dedicated"], "placement"),
    (["cluster.num_gpus=0", "cluster.num_cpus=4", "scenario.gpus=1", "scenario.num_institutions=3",
      "engine.gpu_policy=require"], "scenario.institutions[0].gpus"),
])
def test_named_bad_values_are_refused(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_spec(compose("config", ["smoke=true", *overrides]))
    assert err.value.key == key


def test_a_huge_model_is_checked_without_building_it():
    # widths within the schema's bounds but far beyond memory: the probe runs on torch's meta device
    load_spec(compose("config", ["smoke=true", "model.hidden=[65536,65536,65536]"]))


def test_the_schema_knows_every_dataset_key():
    from sim.core.data import DATASETS, defaults
    from sim.core.data.partition import PARTITIONS

    assert set(schema.DATA) == set(DATASETS) == set(schema.DATASETS) and schema.PARTITIONS == PARTITIONS
    for name in DATASETS:
        assert set(defaults(name)) <= set(schema.DATA[name]), name


def test_every_key_of_the_default_config_has_a_field():
    # Top-level, training, engine, cluster, scenario and institution keys are declared; scheme,
    # model and data keys come from signatures and dataset tables (checked above).
    declared = {(): schema.TOP, ("training",): schema.TRAINING, ("engine",): schema.ENGINE,
                ("cluster",): schema.CLUSTER, ("scenario",): schema.SCENARIO}
    for group, fields in declared.items():
        node = BASE
        for p in group:
            node = node[p]
        assert set(node) - set(schema.OTHER_ENTRY_POINTS) <= set(fields), group
    for row in BASE["scenario"]["institutions"]:
        assert set(row) <= set(schema.INSTITUTION)


def test_a_config_without_training_or_engine_gets_the_command_lines_defaults() -> None:
    # Prepare: the composed default config, and the same as a plain dict that leaves both groups out
    composed = compose("config", ["smoke=true"])
    bare = OmegaConf.to_container(composed, resolve=True)
    del bare["training"], bare["engine"]
    # Execute
    full, built = load_spec(composed), load_spec(bare)
    # Assert: one source of defaults (conf/config.yaml): the dataclasses read theirs from it
    assert built.training == full.training and built.engine == full.engine
    assert TrainingSpec(rounds=full.rounds) == full.training


def test_a_config_error_survives_pickling_as_itself() -> None:
    # Ray ships an exception raised in an actor to the driver pickled: it must arrive as the same one line and key
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("aggregator.byzantine", "needs more than 2f+2=4 updates")))
    assert type(err) is ConfigError and err.key == "aggregator.byzantine"
    assert str(err) == "aggregator.byzantine: needs more than 2f+2=4 updates"
