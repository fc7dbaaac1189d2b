"""Fuzzing the pre-run checks: >= 1,000 random bad inputs, each one line on stderr, exit 2, no traceback, no Ray.

Hypothesis draws misspelt keys, wrong types, out-of-range numbers, unknown group options,
malformed cluster addresses and damaged tables, and feeds them to ``sim.cli.guard`` with
``sim.checks.load_spec`` exactly as ``python -m sim`` does before Hydra and Ray start.
Every generator produces only inputs that are wrong, so any pass is a missed check.
"""

import contextlib
import io
import string
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cli import CONF_DIR, group_options, guard
from sim.checks import load_spec

pytestmark = pytest.mark.filterwarnings("ignore")


def fast(n: int) -> settings:
    """n examples, no per-example deadline (a busy CI box), the same examples every run, no database folder."""
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None)

# Keys known to the composed config (a misspelling must not land on one of them).
KNOWN = ["seed", "rounds", "placement", "smoke", "checkpoint_every", "resume", "overwrite", "training.lr",
         "training.batch_size", "training.local_epochs", "training.momentum", "engine.eval_every",
         "engine.round_timeout_s", "engine.threads_per_institution", "engine.gpu_policy", "cluster.num_cpus",
         "cluster.address", "cluster.connect_timeout_s", "data.num_samples", "data.test_fraction",
         "scenario.availability", "scenario.failure_rate", "scenario.quantity_skew", "model.hidden"]
NUMERIC = ["seed", "rounds", "checkpoint_every", "training.lr", "training.batch_size", "training.local_epochs",
           "training.momentum", "engine.eval_every", "engine.round_timeout_s", "engine.threads_per_institution",
           "cluster.num_cpus", "cluster.connect_timeout_s", "data.num_samples", "data.test_fraction",
           "scenario.availability", "scenario.failure_rate"]
# key -> a strategy of numbers outside its range
OUT_OF_RANGE = {
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),
    "rounds": st.integers(max_value=0),
    "checkpoint_every": st.integers(max_value=-1),
    "training.lr": st.one_of(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False), st.integers(max_value=0)),
    "training.batch_size": st.integers(max_value=0),
    "training.local_epochs": st.integers(max_value=0),
    "training.momentum": st.one_of(st.floats(min_value=1.0, allow_nan=False, allow_infinity=False),
                                   st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False)),
    "engine.eval_every": st.integers(max_value=0),
    "engine.threads_per_institution": st.one_of(st.integers(max_value=0), st.integers(min_value=1025)),
    "engine.round_timeout_s": st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
    "cluster.num_cpus": st.integers(max_value=0),
    "cluster.connect_timeout_s": st.one_of(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
                                           st.floats(min_value=3601.0, allow_nan=False, allow_infinity=False)),
    "data.num_samples": st.one_of(st.integers(max_value=0), st.integers(min_value=10_000_001)),
    "data.test_fraction": st.one_of(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
                                    st.floats(min_value=1.0, allow_nan=False, allow_infinity=False)),
    "scenario.availability": st.one_of(st.floats(min_value=1.000001, allow_nan=False, allow_infinity=False),
                                       st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False)),
    "scenario.failure_rate": st.floats(min_value=1.000001, allow_nan=False, allow_infinity=False),
}
GROUPS = ["scheme", "model", "data", "scenario", "cluster"]


GROUP_KEYS = ("scheme", "model", "data", "scenario", "cluster", "experiment")


@pytest.fixture(scope="module")
def hydra_once():
    """Initialise Hydra once for the module."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def fast_compose(hydra_once):
    """Hydra's compose at a fraction of its cost (~250 ms on a busy 2-core box, too slow for 1,000 examples).

    What Hydra does per call is (1) build the defaults list, which depends only on the group
    choices (``scheme=...``), and (2) apply the value overrides to the composed, struct-mode
    config with ``ConfigLoaderImpl._apply_overrides_to_config``. Here (1) runs for real once per
    set of group choices (so unknown options still fail inside Hydra) and (2) is Hydra's own
    function on a copy: the same errors, in milliseconds. ``test_real_compose_agrees`` checks
    a sample against the real thing.
    """
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import sim.cli

    real, parser, bases = sim.cli.compose, OverridesParser.create(), {}

    def compose(config_name, overrides):
        groups = tuple(o for o in overrides if o.split("=")[0] in GROUP_KEYS)
        values = [o for o in overrides if o.split("=")[0] not in GROUP_KEYS]
        if (config_name, groups) not in bases:
            bases[config_name, groups] = real(config_name, list(groups))
        cfg = copy.deepcopy(bases[config_name, groups])
        ConfigLoaderImpl._apply_overrides_to_config(parser.parse_overrides(values), cfg)
        return cfg

    return compose


def refused(argv: list[str], compose=None) -> None:
    """Run the pre-run checks on ``argv`` and assert: exit 2, exactly one line on stderr starting 'error: '."""
    import sim.cli

    import ray

    err, real, started = io.StringIO(), sim.cli.compose, []
    sim.cli.compose = compose or real  # guard (and its key suggestions) compose through this name
    try:
        # Nothing may start Ray here (a session-wide test cluster may already be up, so ask ray.init, not Ray).
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_, \
                mock.patch.object(ray, "init", lambda *a, **k: started.append(a)):
            guard("config", argv, load_spec)
    finally:
        sim.cli.compose = real
    text = err.getvalue()
    assert exit_.value.code == 2, (argv, text)
    assert text.startswith("error: ") and text.count("\n") == 1, (argv, text)
    assert "Traceback" not in text, (argv, text)
    assert not started, argv  # nothing started


def _literal(v) -> str:
    """A number as Hydra reads it back as the same number."""
    return repr(float(v)) if isinstance(v, float) else str(v)


word = st.text(string.ascii_lowercase, min_size=1, max_size=8).map(lambda s: "x" + s)  # never null/true/inf/nan


@st.composite
def misspelt(draw) -> list[str]:
    key = draw(st.sampled_from(KNOWN))
    parent, _, leaf = key.rpartition(".")
    i = draw(st.integers(0, len(leaf)))
    leaf = leaf[:i] + draw(st.sampled_from(["q", "zz", "_x", "9"])) + leaf[i:]
    wrong = ".".join(filter(None, [parent, leaf]))
    return [f"{wrong}={draw(st.integers(0, 9))}"]


@st.composite
def wrong_type(draw) -> list[str]:
    return [f"{draw(st.sampled_from(NUMERIC))}={draw(word)}"]


@st.composite
def out_of_range(draw) -> list[str]:
    key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    return [f"{key}={_literal(draw(OUT_OF_RANGE[key]))}"]


@st.composite
def unknown_option(draw) -> list[str]:
    group = draw(st.sampled_from(GROUPS))
    name = draw(word.filter(lambda w: w not in group_options(group)))
    return [f"{group}={name}"]


@st.composite
def bad_address(draw) -> list[str]:
    host = draw(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True))
    address = draw(st.sampled_from([
        f"{host}", f"{host}:{draw(st.integers(65536, 10**6))}", f"{host}:0", f"http://{host}:6379",
        f"ray://{host}", f"{host}:{draw(word)}", f"{host} x:6379",
    ]))
    return [f"cluster.address='{address}'"]


bad_override = st.one_of(misspelt(), wrong_type(), out_of_range(), unknown_option(), bad_address())


@fast(800)
@given(argv=bad_override, extra=st.sampled_from([[], ["smoke=true"], ["scheme=fedprox"], ["model=logreg"]]))
def test_random_bad_overrides_are_one_line(argv, extra, fast_compose):
    refused(extra + argv, fast_compose)


@fast(6)  # Hydra's full compose and every check cost seconds an example; the fast compose above covers the variety
@given(argv=bad_override)
def test_real_compose_agrees(argv, hydra_once):
    refused(argv)  # the same kinds of input through Hydra's full compose: also one line, exit 2


def _table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=rows), "b": rng.normal(size=rows),
                         "site": np.where(np.arange(rows) % 2, "x", "y"), "label": np.arange(rows) % 3})


DAMAGE = ["header_only", "nan", "inf", "one_class", "one_class_every_site", "text", "missing_label_column",
          "missing_feature_column", "text_listed"]


@fast(200)  # with the 800 overrides and 6 full composes above: 1,006 bad inputs in all
@given(damage=st.sampled_from(DAMAGE), rows=st.integers(40, 200), seed=st.integers(0, 2**16),
       where=st.integers(0, 39), fmt=st.sampled_from(["csv", "parquet"]))
def test_random_damaged_tables_are_one_line(damage, rows, seed, where, fmt, tmp_path_factory, fast_compose):
    df, extra = _table(rows, seed), []
    if damage == "header_only":
        df = df.head(0)
    elif damage in ("nan", "inf"):
        df.loc[where, "a"] = np.nan if damage == "nan" else -np.inf
    elif damage == "one_class":
        df["label"] = "only"
    elif damage == "one_class_every_site":  # one site of one class runs (with a warning); every site so is refused
        df["label"] = np.where(df.site == "x", 0, 1)
    elif damage in ("text", "text_listed"):
        df["b"] = df["b"].astype(str)  # numbers written as text (as a CSV reader may see them), one of them not a number
        df.loc[where, "b"] = "n/a?"
        extra = ["data.feature_columns=[a,b]"] if damage == "text_listed" else []
    elif damage == "missing_label_column":
        df = df.rename(columns={"label": "class"})
    elif damage == "missing_feature_column":
        extra = ["data.feature_columns=[a,zz]"]
    path = tmp_path_factory.mktemp("t") / f"sites.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    refused(["smoke=true", "data=table", f"data.path={path}", "data.partition=natural",
             "data.institution_column=site", "scenario.num_institutions=null",
             "scenario.institutions=[{name: x, share: 0.5}, {name: y, share: 0.5}]", *extra], fast_compose)
