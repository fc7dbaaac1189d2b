"""Datasets and partitioners: what a user relies on when institutions get their shards."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.data import DATASETS, build_federation, check_data, defaults, sites_from_table
from sim.core.data.partition import apportion, partition, stream
from sim.core.data.synthetic import institution_models
from sim.core.types import ConfigError, InstitutionSpec, Scenario

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def make_scenario(shares, disciplines=None, label_skew=None, feature_skew=None) -> Scenario:
    """A scenario with institutions i0, i1, ... holding the given shares."""
    k = len(shares)
    disciplines = disciplines or ["d"] * k
    label_skew = label_skew or [None] * k
    feature_skew = feature_skew or [0.0] * k
    return Scenario(name="test", institutions=tuple(
        InstitutionSpec(index=i, name=f"i{i}", discipline=disciplines[i], share=shares[i],
                        label_skew=label_skew[i], feature_skew=feature_skew[i])
        for i in range(k)))


def entropy(labels: np.ndarray, num_classes: int) -> float:
    """Shannon entropy (nats) of a label array's class mix."""
    p = np.bincount(labels, minlength=num_classes) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def pool_labels(n=2000, num_classes=10, seed=0) -> np.ndarray:
    """Balanced labels, shuffled."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def partition_cfg(name, **kw) -> dict:
    return {**defaults("digits"), "partition": name, **kw}


def all_arrays(fed):
    for s in fed.shards:
        yield from (s.x_train, s.y_train, s.x_test, s.y_test)
    yield from (fed.x_test, fed.y_test)


@pytest.fixture
def site_frame() -> pd.DataFrame:
    """A multi-site table: 3 sites of 2 disciplines, string labels, a split column, one text column."""
    rng = np.random.default_rng(7)
    sites = ["north", "south", "east"]
    n = [60, 40, 30]
    site = np.repeat(sites, n)
    return pd.DataFrame({
        "site": site,
        "field": np.where(site == "east", "finance", "medicine"),
        "split": np.where(rng.random(len(site)) < 0.25, "test", "train"),
        "diagnosis": rng.choice(["emu", "cat", "dog"], len(site)),
        "age": rng.normal(50, 10, len(site)),
        "dose": rng.normal(3, 2, len(site)),
        "note": ["free text"] * len(site),  # not numeric: left out of the features
    })


def write(df: pd.DataFrame, tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"sites.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    return path


def table_cfg(path, **kw) -> dict:
    return {"name": "table", "path": str(path), "label_column": "diagnosis", "institution_column": "site",
            "discipline_column": "field", "split_column": "split", "partition": "natural", **kw}


# --- partitioners -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=12), st.integers(0, 5000))
def test_apportion_counts_are_within_one_of_share_times_total(weights, total):
    # Prepare: shares that sum to 1
    shares = np.array(weights) / sum(weights)
    # Execute
    counts = apportion(shares, total)
    # Assert: rounding moves no institution by a whole sample, and nothing is lost or invented
    assert np.all(np.abs(counts - shares * total) < 1 + 1e-9)
    assert counts.sum() == total


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity"])
def test_partition_uses_every_index_at_most_once(name):
    labels = pool_labels()
    scenario = make_scenario([0.4, 0.3, 0.2, 0.1])
    parts = partition(labels, 10, partition_cfg(name), scenario, stream(0, 1))
    every = np.concatenate(parts)
    assert len(every) == len(np.unique(every)) == len(labels)  # shares sum to 1: the whole pool, once


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_sizes_follow_shares_within_rounding(name):
    labels = pool_labels()
    shares = [0.5, 0.25, 0.15, 0.1]
    parts = partition(labels, 10, partition_cfg(name), make_scenario(shares), stream(0, 1))
    assert np.all(np.abs(np.array([len(p) for p in parts]) - np.array(shares) * len(labels)) <= 1)


def test_iid_label_mix_matches_the_pool():
    labels = pool_labels()
    parts = partition(labels, 10, partition_cfg("iid"), make_scenario([0.5, 0.3, 0.2]), stream(0, 1))
    for idx in parts:  # stratified: every class within one sample of its 10% (400+ samples each)
        assert np.all(np.abs(np.bincount(labels[idx], minlength=10) - len(idx) / 10) <= 1)


def test_small_dirichlet_alpha_skews_labels_more_than_large():
    labels = pool_labels()
    scenario = make_scenario([0.1] * 10)
    mean_entropy = {}
    for alpha in (0.1, 100.0):
        parts = partition(labels, 10, partition_cfg("dirichlet", dirichlet_alpha=alpha), scenario, stream(0, 1))
        mean_entropy[alpha] = np.mean([entropy(labels[p], 10) for p in parts])
    # Uniform is log(10) = 2.30; alpha=100 stays near it, alpha=0.1 puts most mass on 1-2 classes (~0.7).
    # A 0.5-nat gap leaves ample room for the fallback that fills classes which ran out.
    assert mean_entropy[0.1] < mean_entropy[100.0] - 0.5


def test_institution_label_skew_is_honoured_even_under_iid():
    labels = pool_labels()
    scenario = make_scenario([0.1, 0.3, 0.3, 0.3], label_skew=[0.05, None, None, None])
    parts = partition(labels, 10, partition_cfg("iid"), scenario, stream(0, 1))
    skewed, plain = entropy(labels[parts[0]], 10), entropy(labels[parts[1]], 10)
    assert skewed < 1.0 < plain  # alpha 0.05: nearly one class; the others stay near log(10)


def test_quantity_replaces_shares_with_unequal_power_law_sizes():
    labels = pool_labels()
    scenario = make_scenario([0.2] * 5)
    sizes = [len(p) for p in partition(labels, 10, partition_cfg("quantity"), scenario, stream(0, 1))]
    equal = [len(p) for p in partition(labels, 10, partition_cfg("quantity", quantity_exponent=0), scenario,
                                       stream(0, 1))]
    assert sum(sizes) == len(labels)
    assert max(sizes) / min(sizes) > 10  # ranks 1..5 with exponent 1.5: 5**1.5 = 11.2 up to rounding
    assert max(equal) - min(equal) <= 1


# --- errors before anything runs --------------------------------------------------------


@pytest.mark.parametrize("data, key", [
    ({"name": "digits", "partition": "stripes"}, "data.partition"),
    ({"name": "synthetic", "partition": "iid"}, "data.partition"),
    ({"name": "digits", "partition": "natural"}, "data.partition"),
    ({"name": "mnist"}, "data.name"),
    ({"name": "digits", "dirichlet_alpa": 0.1}, "data.dirichlet_alpa"),
    ({"name": "digits", "test_fraction": 1.5}, "data.test_fraction"),
    ({"name": "digits", "partition": "dirichlet", "dirichlet_alpha": 0}, "data.dirichlet_alpha"),
    ({"name": "synthetic", "within": 2}, "data.within"),
    ({"name": "synthetic", "num_samples": 20}, "data.num_samples"),
])
def test_bad_data_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        check_data(data, make_scenario([0.5, 0.3, 0.2]))
    assert err.value.key == key


def test_unknown_partition_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of iid, dirichlet, quantity, natural"):
        check_data({"name": "digits", "partition": "stripes"}, make_scenario([1.0]))


def test_too_small_a_share_names_the_institution_and_the_fix():
    with pytest.raises(ConfigError, match=r"'i1'.*raise its share") as err:
        build_federation({"name": "digits"}, make_scenario([0.998, 0.002]), seed=0)
    assert err.value.key == "scenario.institutions"
    with pytest.raises(ConfigError, match="raise data.num_samples to at least"):
        check_data({"name": "synthetic", "num_samples": 100}, make_scenario([0.95, 0.05]))


# --- determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{"name": "synthetic"}, {"name": "digits", "partition": "dirichlet"}])
def test_same_seed_gives_identical_arrays_and_another_seed_does_not(data):
    scenario = make_scenario([0.5, 0.3, 0.2], label_skew=[None, 0.3, None], feature_skew=[0.0, 0.0, 0.5])
    a, b = (build_federation(data, scenario, seed=3, smoke=True) for _ in range(2))
    c = build_federation(data, scenario, seed=4, smoke=True)
    assert all(np.array_equal(x, y) for x, y in zip(all_arrays(a), all_arrays(b)))  # bit-identical
    assert not np.array_equal(a.shards[0].x_train, c.shards[0].x_train)


# --- synthetic --------------------------------------------------------------------------


def test_synthetic_shards_have_the_planned_sizes_and_types():
    scenario = make_scenario([0.5, 0.3, 0.2])
    fed = build_federation({"name": "synthetic", "num_samples": 1000}, scenario, seed=0)
    assert [s.num_train + len(s.y_val) + len(s.y_test) for s in fed.shards] == [500, 300, 200]
    assert [len(s.y_test) for s in fed.shards] == [100, 60, 40]  # test_fraction 0.2
    assert fed.input_shape == (60,) and fed.num_classes == 10
    assert fed.shards[0].x_train.dtype == np.float32 and fed.shards[0].y_train.dtype == np.int64
    assert np.array_equal(fed.y_test, np.concatenate([s.y_test for s in fed.shards]))  # scenario order
    assert len(build_federation({"name": "synthetic"}, scenario, seed=0, smoke=True).y_test) <= 120


def test_synthetic_disciplines_differ_more_than_institutions_within_one():
    # Prepare: three disciplines of two institutions each
    scenario = make_scenario([1 / 6] * 6, disciplines=["med", "med", "phys", "phys", "fin", "fin"])
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    same = [(i, j) for i, j in pairs if i // 2 == j // 2]
    cross = [(i, j) for i, j in pairs if i // 2 != j // 2]
    agreement = {"same": [], "cross": []}
    for seed in range(3):
        # Execute
        data = {"name": "synthetic", "num_samples": 1200, "within": 0.2, "between": 1.0}  # the paper's unrelated disciplines
        fed = build_federation(data, scenario, seed=seed)
        models = institution_models(defaults("synthetic") | data, scenario, seed)
        means = [s.x_train.mean(axis=0) for s in fed.shards]
        # Assert (inputs): expected squared distance within a discipline is within=0.2 of that across,
        # so distances are ~0.45 of the cross ones; 0.7 leaves room for sampling noise (seen 0.43-0.51).
        gap = {name: np.mean([np.linalg.norm(means[i] - means[j]) for i, j in ps])
               for name, ps in (("same", same), ("cross", cross))}
        assert gap["same"] < 0.7 * gap["cross"]
        # How often institution i's labelling rule gives j's labels: a perfect model of i used at j.
        for name, ps in (("same", same), ("cross", cross)):
            for i, j in ps:
                x, y = fed.shards[j].x_train, fed.shards[j].y_train
                agreement[name].append(np.mean(np.argmax(x @ models[i].W + models[i].b, axis=1) == y))
    # Assert (labels): seen ~0.39 within vs ~0.07 across; a factor of 2 is far from chance.
    assert np.mean(agreement["same"]) > 2 * np.mean(agreement["cross"])


def test_within_zero_gives_one_generator_per_discipline():
    scenario = make_scenario([0.25] * 4, disciplines=["a", "a", "b", "b"])
    models = institution_models({**defaults("synthetic"), "within": 0.0}, scenario, seed=0)
    assert np.array_equal(models[0].W, models[1].W) and not np.array_equal(models[0].W, models[2].W)


def test_synthetic_label_skew_narrows_the_label_mix():
    def mean_entropy(alpha):
        scenario = make_scenario([1 / 6] * 6, label_skew=[alpha] * 6)
        fed = build_federation({"name": "synthetic", "num_samples": 1200}, scenario, seed=0)
        return np.mean([entropy(np.concatenate([s.y_train, s.y_test]), 10) for s in fed.shards])
    # Seen 0.35 vs 0.60 nats: generators already favour few classes, so the gap is modest but clear.
    assert mean_entropy(0.05) < mean_entropy(100.0) - 0.1


def test_feature_skew_shifts_all_inputs_of_that_institution_by_one_fixed_vector():
    plain = build_federation({"name": "synthetic"}, make_scenario([0.5, 0.5]), seed=0, smoke=True)
    skewed = build_federation({"name": "synthetic"}, make_scenario([0.5, 0.5], feature_skew=[0.0, 2.0]),
                              seed=0, smoke=True)
    shift = skewed.shards[1].x_train - plain.shards[1].x_train
    assert np.allclose(shift, shift[0], atol=1e-5)  # same vector on every row (float32 rounding only)
    assert np.allclose(skewed.shards[1].x_test - plain.shards[1].x_test, shift[0], atol=1e-5)
    assert 1.0 < shift[0].std() < 3.0  # std 2 over 60 draws
    assert np.array_equal(skewed.shards[1].y_train, plain.shards[1].y_train)  # labels untouched
    assert np.array_equal(skewed.shards[0].x_train, plain.shards[0].x_train)  # others untouched


# --- digits -----------------------------------------------------------------------------


def test_digits_are_scaled_images_split_among_institutions():
    fed = build_federation({"name": "digits"}, make_scenario([0.5, 0.3, 0.2]), seed=0)
    assert fed.input_shape == (1, 8, 8) and fed.num_classes == 10
    assert fed.shards[0].x_train.shape[1:] == (1, 8, 8)
    assert 0.0 <= min(s.x_train.min() for s in fed.shards) and max(s.x_train.max() for s in fed.shards) <= 1.0
    assert sum(s.num_train + len(s.y_val) + len(s.y_test) for s in fed.shards) == 1797  # the whole pool
    smoke = build_federation({"name": "digits"}, make_scenario([0.5, 0.3, 0.2]), seed=0, smoke=True)
    assert sum(s.num_train + len(s.y_val) + len(s.y_test) for s in smoke.shards) == 600


# --- table ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_round_trip_with_natural_partition_and_split_column(site_frame, tmp_path, fmt):
    # Prepare: a scenario built straight from the file (no validation rows, so train is exactly the split column's)
    data = table_cfg(write(site_frame, tmp_path, fmt)) | {"val_fraction": 0.0}
    sites = sites_from_table(data)
    scenario = Scenario("sites", tuple(
        InstitutionSpec(index=i, name=n, discipline=d, share=rows / len(site_frame))
        for i, (n, d, rows) in enumerate(sites)))
    # Execute
    fed = build_federation(data, scenario, seed=0)
    # Assert
    assert sites == [("north", "medicine", 60), ("south", "medicine", 40), ("east", "finance", 30)]
    assert fed.input_shape == (2,) and fed.num_classes == 3  # age, dose; "note" is text
    codes = {"cat": 0, "dog": 1, "emu": 2}  # sorted order
    for shard in fed.shards:
        rows = site_frame[site_frame.site == shard.name]
        train, test = rows[rows.split == "train"], rows[rows.split == "test"]
        assert np.array_equal(shard.y_train, train.diagnosis.map(codes).to_numpy())
        assert np.array_equal(shard.y_test, test.diagnosis.map(codes).to_numpy())
    x_train = np.concatenate([s.x_train for s in fed.shards])
    # Standardised on training rows: mean 0, std 1 up to float32 rounding.
    assert np.allclose(x_train.mean(axis=0), 0, atol=1e-5) and np.allclose(x_train.std(axis=0), 1, atol=1e-5)


def test_table_can_be_partitioned_like_any_pool(site_frame, tmp_path):
    data = {"name": "table", "path": str(write(site_frame, tmp_path, "csv")), "label_column": "diagnosis",
            "feature_columns": ["age", "dose"], "partition": "dirichlet"}
    fed = build_federation(data, make_scenario([0.6, 0.4]), seed=0)
    assert sum(s.num_train + len(s.y_val) + len(s.y_test) for s in fed.shards) == len(site_frame)
    assert [len(s.y_test) for s in fed.shards] == [16, 10]  # round(0.2 * 78), round(0.2 * 52)


@pytest.mark.parametrize("change, key", [
    ({"path": "/no/such/file.csv"}, "data.path"),
    ({"label_column": "outcome"}, "data.label_column"),
    ({"split_column": "fold"}, "data.split_column"),
    ({"feature_columns": ["age", "weight"]}, "data.feature_columns"),
    ({"feature_columns": ["age", "note"]}, "data.feature_columns"),
    ({"institution_column": None}, "data.institution_column"),
    ({"split_column": "field"}, "data.split_column"),  # values are not train/test
])
def test_bad_table_config_names_the_key(site_frame, tmp_path, change, key):
    data = {**table_cfg(write(site_frame, tmp_path, "csv")), **change}
    scenario = Scenario("s", tuple(InstitutionSpec(index=i, name=n, discipline="d", share=0.5)
                                   for i, n in enumerate(["north", "south"])))
    with pytest.raises(ConfigError) as err:
        build_federation(data, scenario, seed=0)
    assert err.value.key == key


def test_institution_missing_from_the_file_lists_the_names_found(site_frame, tmp_path):
    data = table_cfg(write(site_frame, tmp_path, "parquet"))
    scenario = make_scenario([0.5, 0.5])  # i0, i1: not sites of the file
    with pytest.raises(ConfigError, match="names found: north, south, east") as err:
        check_data(data, scenario)
    assert err.value.key == "data.institution_column"


# --- config files -----------------------------------------------------------------------


@pytest.mark.parametrize("data", [{"name": "synthetic"}, {"name": "digits", "partition": "dirichlet"},
                                  {"name": "digits", "partition": "quantity"}])
def test_default_scenario_builds_with_every_institution_scored(data):
    specs = yaml.safe_load((CONF.parent / "scenario" / "default.yaml").read_text())["institutions"]
    scenario = Scenario("default", tuple(InstitutionSpec(index=i, **spec) for i, spec in enumerate(specs)))
    fed = build_federation(data, scenario, seed=0, smoke=True)
    assert [s.name for s in fed.shards] == list(scenario.names)
    assert all(s.num_train >= 4 and len(s.y_test) >= 2 for s in fed.shards)
    assert len(fed.y_test) == sum(len(s.y_test) for s in fed.shards) <= 120  # smoke: ~600 samples, 20% test



@pytest.mark.parametrize("name", sorted(DATASETS))
def test_each_dataset_has_a_yaml_with_its_defaults_and_a_comment_per_field(name):
    text = (CONF / f"{name}.yaml").read_text()
    loaded = yaml.safe_load(text)
    loaded.pop("defaults", None)  # Hydra's defaults list (data=docstrings brings its scenario), not a data key
    assert loaded == defaults(name)
    fields = [line for line in text.splitlines() if re.match(r"^\w+:", line)]
    assert fields and all("#" in line for line in fields)
    assert {p.stem for p in CONF.glob("*.yaml")} == set(DATASETS)


def test_smaller_between_gives_disciplines_a_shared_task():
    # Prepare: two disciplines; agreement of one institution's labelling rule with the other discipline's labels
    scenario = make_scenario([0.5, 0.5], disciplines=["med", "phys"])

    def cross_agreement(between: float) -> float:
        data = defaults("synthetic") | {"num_samples": 2000, "between": between}
        fed = build_federation(data, scenario, seed=0)
        m = institution_models(data, scenario, 0)[0]
        x, y = fed.shards[1].x_train, fed.shards[1].y_train
        return float(np.mean(np.argmax(x @ m.W + m.b, axis=1) == y))

    # Execute / Assert: between=0 leaves only the within-discipline spread, so rules agree far more
    # than between=1 (unrelated tasks, ~chance); 0.2 of margin is well above sampling noise on 800 rows.
    assert cross_agreement(0.0) > cross_agreement(1.0) + 0.2


def test_digits_read_from_scikit_learns_file_equal_its_loader_and_fall_back_to_it(monkeypatch) -> None:
    import importlib.util

    from sklearn.datasets import load_digits

    from sim.core.data import digits

    # Prepare: what scikit-learn's own loader gives, scaled as collabsim scales it
    bunch = load_digits()
    want_x, want_y = (bunch.images / 16.0).astype(np.float32)[:, None, :, :], bunch.target.astype(np.int64)
    # Execute: the file read directly, then with the file nowhere to be found (the loader's path)
    direct = digits.load()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    fallback = digits.load()
    # Assert: the same arrays both ways
    for x, y in (direct, fallback):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert np.array_equal(x, want_x) and np.array_equal(y, want_y)
