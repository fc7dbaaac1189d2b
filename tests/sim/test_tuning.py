"""compare tune=N: the same budget of Tune trials per scheme, chosen on validation data only, refused bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from sim.cli import compose, use_search_path
from sim.compare import check, compare, scheme_configs
from sim.core.types import ConfigError
from sim.engine import run
from sim.sweep import tuning

TINY = ["smoke=true", "rounds=2", "data.num_samples=600", "engine.backend=inprocess", "seeds=1", "report=false"]


@pytest.mark.parametrize("value", ["-1", "1.5", "true", "abc"])
def test_a_tune_that_is_no_whole_number_of_trials_is_refused_in_one_line(value):
    args = [*TINY, f"tune={value}"]
    with pytest.raises(ConfigError) as e:
        check(compose("compare", args), args)
    assert e.value.key == "tune" and "whole number of trials" in str(e.value) and "\n" not in str(e.value)


def test_a_scheme_without_a_search_space_and_variants_are_refused_when_tuning():
    args = [*TINY, "tune=2", "schemes=[fedavg,ditto]"]
    with pytest.raises(ConfigError, match=r"tune: scheme ditto has no search space \(scheme_search/ditto.yaml"):
        check(compose("compare", args), args)
    args = [*TINY, "tune=2", "schemes=[fedavg]", "+variants.slow=['scheme=fedavg','training.lr=0.01']"]
    with pytest.raises(ConfigError, match="variants and parts are settings of their own"):
        check(compose("compare", args), args)
    # tune=0 (the default) asks nothing of search spaces
    args = [*TINY, "schemes=[fedavg,ditto]"]
    check(compose("compare", args), args)


@pytest.mark.parametrize("space, named", [
    ({"training.lrr": {"loguniform": [0.01, 0.1]}}, "scheme_search/myavg.yaml: training.lrr: not a key of the myavg run config"),
    ({"training.local_epochs": {"choice": [1, 0]}}, "scheme_search/myavg.yaml: training.local_epochs: expected a whole number >= 1"),
    ({"training.lr": {"uniform": [0.1]}}, "scheme_search/myavg.yaml: training.lr: uniform needs [lo, hi]"),
])
def test_a_bad_search_space_is_refused_naming_its_file_and_key(tmp_path, space, named):
    # Prepare: a user's scheme (fedavg under another name) and its search space, in a config folder of their own
    (tmp_path / "scheme").mkdir()
    (tmp_path / "scheme_search").mkdir()
    (tmp_path / "scheme" / "myavg.yaml").write_text("defaults:\n  - fedavg\n  - _self_\n")
    (tmp_path / "scheme_search" / "myavg.yaml").write_text(yaml.safe_dump(space))
    use_search_path([f"file://{tmp_path}"])
    try:
        args = [*TINY, "tune=2", "schemes=[myavg]"]
        with pytest.raises(ConfigError) as e:
            check(compose("compare", args), args)
    finally:
        use_search_path([])
    assert str(e.value).startswith(named) and "\n" not in str(e.value)


def test_every_shipped_search_space_fits_its_scheme():
    # The default compare's schemes: every key exists and both ends of every range pass the run's checks
    args = [*TINY, "tune=2"]
    check(compose("compare", args), args)
    # The other shipped spaces: every key exists in its scheme's run config
    args = [*TINY, "tune=2", "schemes=[fedsgd,fedavgm]"]
    cfg = compose("compare", args)
    assert set(tuning.check_tuning(cfg, scheme_configs(cfg, args))) == {"isolated", "fedsgd", "fedavgm"}


def test_every_scheme_gets_the_same_budget_its_config_settings_first_and_the_same_draws_for_the_same_seed():
    cfg = compose("config", ["scheme=fedprox"])
    dims = tuning.search_space("fedprox")
    first = tuning.candidates("fedprox", dims, cfg, 5, seed=0)
    assert len(first) == 5 and first[0] == {"training.lr": 0.05, "training.local_epochs": 5, "scheme.mu": 0.01,
                                            "scheme.server_lr": 1.0}
    assert first == tuning.candidates("fedprox", dims, cfg, 5, seed=0)  # determinism: same seed, same trials
    assert first[1:] != tuning.candidates("fedprox", dims, cfg, 5, seed=1)[1:]
    for trial in first[1:]:
        assert 0.005 <= trial["training.lr"] <= 0.5 and trial["training.local_epochs"] in (1, 2, 5, 10)
        assert 0.001 <= trial["scheme.mu"] <= 1.0
    for scheme in ("isolated", "fedavg", "scaffold", "fedsgd"):
        sub = compose("config", [f"scheme={scheme}"])
        assert len(tuning.candidates(scheme, tuning.search_space(scheme), sub, 5, seed=0)) == 5


def test_the_choice_reads_validation_rows_only(small_cfg):
    # Prepare: two real trials of fedavg, one with a learning rate that does better on validation data
    runs = {lr: run(small_cfg("scheme=fedavg", f"training.lr={lr}"), backend="inprocess").metrics for lr in (0.001, 0.05)}
    def trials(metrics):
        return pd.DataFrame([{"scheme": "fedavg", "trial": k, "values": {"training.lr": lr},
                              tuning.OBJECTIVE: tuning.validation_score(m), "diverged": 0.0}
                             for k, (lr, m) in enumerate(metrics.items())])
    chosen = tuning.choose(trials(runs))
    assert chosen["settings"].iloc[0] == "training.lr=0.05" and chosen["chosen_on"].iloc[0] == "validation"
    # Execute: corrupt the test data's results (every test accuracy and loss) so the other trial looks far better
    corrupted = {}
    for lr, m in runs.items():
        m = m.copy()
        test = m["metric"].isin(["accuracy", "loss"])
        m.loc[test, "value"] = 1.0 if lr == 0.001 else 0.0
        corrupted[lr] = m
    # Assert: the choice does not move; corrupting the validation rows the same way does move it
    pd.testing.assert_frame_equal(tuning.choose(trials(corrupted)), chosen)
    for lr, m in corrupted.items():
        m.loc[m["metric"] == "val_accuracy", "value"] = 1.0 if lr == 0.001 else 0.0
    assert tuning.choose(trials(corrupted))["settings"].iloc[0] == "training.lr=0.001"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, ray_cluster):
    """A real tuned compare: fedavg and the isolated baseline, 2 Ray Tune trials each, one seed."""
    out = tmp_path_factory.mktemp("tuned")
    args = [*TINY, "schemes=[fedavg]", "tune=2"]
    table = compare(compose("compare", args), args, out)
    return out, table, args


def test_a_tuned_compare_gives_every_scheme_the_same_trials_and_runs_the_choice(tuned):
    out, table, _ = tuned
    trials, chosen = pd.read_csv(out / "tuning.csv"), pd.read_csv(out / "tuned.csv")
    assert trials.groupby("scheme").size().to_dict() == {"isolated": 2, "fedavg": 2}
    assert list(chosen["scheme"]) == ["isolated", "fedavg"] and set(chosen["chosen_on"]) == {"validation"}
    assert list(table["tuned_settings"]) == list(chosen["settings"])
    assert table.attrs["tuning"][0].startswith("tuning: each scheme had the same 2 Ray Tune trials")
    # The compare's runs ran with the chosen settings
    fedavg = chosen.set_index("scheme").loc["fedavg"]
    ran = yaml.safe_load((out / "runs" / "fedavg" / "config.yaml").read_text())
    assert f"training.lr={ran['training']['lr']:.3g}" in fedavg["settings"]


def test_the_same_seed_chooses_the_same_settings_whatever_order_tune_ran_the_trials(tuned):
    # Execute: every trial again, one after another in this process, and the choice made from them
    out, _, args = tuned
    again = []
    cfg = compose("compare", args)
    for scheme in ("isolated", "fedavg"):
        sub = compose("config", [*TINY[:4], f"scheme={scheme}"])  # the compare's run overrides: TINY less seeds, report
        for k, values in enumerate(tuning.candidates(scheme, tuning.search_space(scheme), sub, 2, int(cfg.seed))):
            score = tuning.run_trial(tuning.trial_overrides(TINY[:4], scheme, values))
            again.append({"scheme": scheme, "trial": k, "values": values, **score})
    # Assert: the same scores and the same choices as the compare's Tune trials
    expected = pd.read_csv(out / "tuned.csv")
    got = tuning.choose(pd.DataFrame(again))
    assert list(got["settings"]) == list(expected["settings"])
    assert got["val_score"].tolist() == pytest.approx(expected["val_score"].tolist(), abs=1e-12)
