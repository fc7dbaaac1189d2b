"""Scoring every N rounds or only the cohort, and compare's seeds and variants (in-process: no actors)."""

import numpy as np
import pandas as pd
import pytest

from sim.cli import compose, guard
from sim.compare import compare, scheme_configs
from sim.engine import run
from sim.core.types import ConfigError


def test_eval_every_scores_round_zero_multiples_and_the_last_round(small_cfg):
    m = run(small_cfg("rounds=3", "engine.eval_every=2"), backend="inprocess").metrics  # smoke runs stop at 3 rounds
    scored = sorted(m[m.metric == "accuracy"]["round"].unique())
    assert scored == [0, 2, 3]
    # Training is unchanged by how often it is scored: the last round equals that of a run scored every round.
    every = run(small_cfg("rounds=3"), backend="inprocess").metrics
    last = lambda t: t[(t["round"] == 3) & (t.metric == "accuracy")].sort_values("institution").value.to_numpy()
    np.testing.assert_array_equal(last(m), last(every))


def test_eval_scope_cohort_scores_only_who_trained_and_everybody_at_the_end(small_cfg):
    result = run(small_cfg("rounds=3", "scheme.cohort_fraction=0.5", "engine.eval_scope=cohort"), backend="inprocess")
    m, ledger = result.metrics, result.ledger
    acc = m[(m.metric == "accuracy") & (m.institution != "global")]
    for r in (1, 2):
        cohort = set(ledger[(ledger["round"] == r) & ledger.participated & (ledger.institution != "global")].institution)
        assert set(acc[acc["round"] == r].institution) == cohort and len(cohort) == 3
    assert acc[acc["round"] == 3].institution.nunique() == 6 == acc[acc["round"] == 0].institution.nunique()


def test_compare_runs_every_scheme_on_every_seed_and_labels_variants(tmp_path):
    # Prepare: two schemes (isolated is added), two seeds, and fedavg with another learning rate as a variant
    overrides = ["smoke=true", "rounds=2", "data.num_samples=600", "engine.backend=inprocess", "schemes=[fedavg]",
                 "seeds=2", "+variants.fedavg_slow=['scheme=fedavg','training.lr=0.01']"]
    cfg = compose("compare", overrides)
    # Execute
    table = compare(cfg, overrides, tmp_path)
    # Assert: 3 labels x 2 seeds, each run directory named by scheme and seed; the variant carries its own label
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert set(zip(m.scheme, m.seed)) == {(s, k) for s in ("isolated", "fedavg", "fedavg_slow") for k in (0, 1)}
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {f"{s}-s{k}" for s in ("isolated", "fedavg", "fedavg_slow")
                                                              for k in (0, 1)}
    assert list(table.scheme) == ["isolated", "fedavg", "fedavg_slow"]
    # The summary is the mean over seeds of each run's own numbers.
    per_run = m[(m.institution == "global") & (m.metric == "accuracy") & (m["round"] == 2)]
    expected = per_run.groupby("scheme").value.mean()
    got = table.set_index("scheme").global_accuracy
    for s in ("fedavg", "fedavg_slow"):
        assert np.isclose(got[s], expected[s])
    loss = m[(m.institution == "global") & (m.metric == "loss") & (m["round"] == 2)].groupby("scheme").value.mean()
    assert not np.isclose(loss["fedavg"], loss["fedavg_slow"])  # the variant really ran with its own lr


@pytest.mark.parametrize("resume, named", [("/some/run", "is one run's directory, and a compare runs several schemes")])
def test_a_compare_never_takes_one_run_for_every_scheme(resume, named, capsys, tmp_path) -> None:
    # The reported command: python -m sim.compare resume=<one run's dir> hydra.run.dir=NEW once wrote a summary in
    # which all four "schemes" were the same FedProx run; it is refused in one line before anything runs
    from sim.compare import check

    with pytest.raises(SystemExit) as exit_:
        guard("compare", [f"resume={resume}", f"hydra.run.dir={tmp_path / 'new'}"], check, with_overrides=True)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: resume: ") and named in err
    assert not (tmp_path / "new").exists()


def test_an_interrupted_compare_resumed_equals_a_straight_one(tmp_path, monkeypatch) -> None:
    # Prepare: a small compare, and the same one stopped by Ctrl-C in round 3 of its second run (checkpoint at round 2)
    import sim.compare as cmp
    from sim.engine import run as real_run

    args = ["smoke=true", "engine.backend=inprocess", "seeds=1", "schemes=[isolated,fedavg,fedprox]", "rounds=4",
            "checkpoint_every=2", "report=false"]
    straight = compare(compose("compare", args), args, tmp_path / "straight")
    calls = []

    def stopped(cfg, out_dir=None, **kw):
        calls.append(out_dir)

        def ctrl_c(r, _):
            if len(calls) == 2 and r == 3:
                raise KeyboardInterrupt

        return real_run(cfg, out_dir, on_round=ctrl_c, **kw)

    monkeypatch.setattr("sim.engine.run", stopped)
    with pytest.raises(KeyboardInterrupt):
        compare(compose("compare", args), args, tmp_path / "cut")
    assert cmp.runs_done(tmp_path / "cut") == (1, 3)
    # Execute: the same command plus resume=true, in the same directory
    monkeypatch.setattr("sim.engine.run", real_run)
    resumed = compare(compose("compare", [*args, "resume=true"]), [*args, "resume=true"], tmp_path / "cut")
    # Assert: the same summary and tables as the straight compare; a compare of other settings is refused
    pd.testing.assert_frame_equal(straight, resumed)
    for table in ("metrics", "ledger"):
        a, b = (pd.read_parquet(d / f"{table}.parquet").drop(columns=["compute_seconds"], errors="ignore")
                for d in (tmp_path / "straight", tmp_path / "cut"))
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    other = [*args[:-1], "seeds=2", "report=false"]
    with pytest.raises(ConfigError, match="holds a compare of other settings"):
        compare(compose("compare", [*other, "resume=true"]), [*other, "resume=true"], tmp_path / "cut")


def test_resume_true_where_no_compare_started_is_refused_before_anything_runs(tmp_path) -> None:
    args = ["smoke=true", "engine.backend=inprocess", "seeds=1", "resume=true"]
    (tmp_path / "new").mkdir()
    with pytest.raises(ConfigError, match="holds no compare to continue"):
        compare(compose("compare", args), args, tmp_path / "new")
    assert not any((tmp_path / "new").iterdir())


def test_a_compare_in_parts_measures_each_parts_gains_against_its_own_baseline(tmp_path):
    # Prepare: two comparisons in one command: fedavg on 600 samples, fedprox on 900 (so their baselines differ)
    overrides = ["rounds=2", "engine.backend=inprocess", "seeds=1", "report=false",
                 "+parts.small.schemes=[fedavg]", "+parts.small.overrides=['data.num_samples=600']",
                 "+parts.large.schemes=[fedprox]", "+parts.large.overrides=['data.num_samples=900']"]
    # Execute
    table = compare(compose("compare", overrides), overrides, tmp_path)
    # Assert: each part's runs carry its label as the scenario, each has its own isolated run, and each gain is
    # the scheme's accuracy minus its own part's baseline
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert set(zip(m.scenario, m.scheme)) == {("small", "isolated"), ("small", "fedavg"), ("large", "isolated"),
                                              ("large", "fedprox")}
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"small-isolated", "small-fedavg", "large-isolated",
                                                              "large-fedprox"}
    finals = m[(m.metric == "accuracy") & (m.institution != "global") & m.selected.astype(bool)]
    own = finals.groupby(["scenario", "scheme"]).value.mean()
    rows = table.set_index(["scenario", "scheme"])
    for part, scheme in (("small", "fedavg"), ("large", "fedprox")):
        assert rows.loc[(part, scheme), "mean_gain"] == pytest.approx((own[part, scheme] - own[part, "isolated"]) * 100)
    assert own["small", "isolated"] != own["large", "isolated"]


@pytest.mark.parametrize("extra, key, words", [
    (["+parts.x.typo=1"], "parts.x", "unknown key(s) typo; a part takes schemes, overrides and variants"),
    (["+parts.x.overrides=rounds"], "parts.x.overrides", "expected a list of overrides"),
    (["+parts.y.schemes=[isolated]"], "parts.y.schemes", "holds only isolated"),
])
def test_a_bad_part_is_one_line_naming_it(extra, key, words):
    overrides = ["+parts.x.schemes=[fedavg]", *extra]
    with pytest.raises(ConfigError) as err:
        scheme_configs(compose("compare", overrides), overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)
