"""Numbers of analysis.metrics on the small hand-built tables (see conftest.small_tables for the values)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import metrics as m
from sim.core.results import frame

# Accuracies are decimal fractions like 0.7 - 0.6 whose float difference is off by ~1e-16;
# 1e-9 is far below any rounding the report shows and far above float noise.
TOL = 1e-9


def test_final_round_ignores_earlier_rounds(small):
    # Prepare
    metrics, _, _ = small
    # Execute
    final = m.final_table(metrics)
    # Assert: round 0 values were 0.1 everywhere; only round 1 may appear
    assert set(final["accuracy"]) == {0.60, 0.70, 0.80, 0.78, 0.75, 0.76, 0.74}
    assert len(final) == 10  # 4 runs x 2 institutions + 2 global rows


def test_gain_per_seed_matches_isolated_on_scenario_and_seed(small):
    gains = m.gain_table(small[0]).set_index(["institution", "seed"])
    assert gains.loc[("A", 0), "gain"] == pytest.approx(10.0, abs=TOL)  # (0.70 - 0.60) x 100 points
    assert gains.loc[("A", 1), "gain"] == pytest.approx(5.0, abs=TOL)
    assert gains.loc[("B", 1), "gain"] == pytest.approx(-4.0, abs=TOL)
    assert gains.loc[("A", 0), "loss_change"] == pytest.approx(-0.10, abs=TOL)
    assert "global" not in gains.index.get_level_values("institution")


def test_gain_mean_over_two_seeds_and_no_interval_below_three(small):
    summary = m.gain_summary(m.gain_table(small[0])).set_index("institution")
    assert summary.loc["A", "gain"] == pytest.approx(7.5, abs=TOL)
    # From two seeds a t-interval is +-31.8 points (t(0.975, 1) = 12.706): too wide to mean anything, so none is given.
    assert np.isnan(summary.loc["A", "gain_low"]) and np.isnan(summary.loc["A", "gain_high"])
    assert summary.loc["A", "seeds"] == 2
    assert not summary.loc["A", "worse_off"]
    assert summary.loc["B", "worse_off"]  # -2 and -4: loses by joining


def test_t_interval_from_three_seeds_matches_a_hand_computation():
    # Values 1, 2, 6: mean 3, sd sqrt(7), se sqrt(7/3); t(0.975, 2) = 4.302653 (tables).
    mean, low, high = m.mean_interval([1.0, 2.0, 6.0])
    half = 4.302653 * np.sqrt(7 / 3)
    assert mean == pytest.approx(3.0) and low == pytest.approx(3 - half, abs=1e-5) and high == pytest.approx(3 + half, abs=1e-5)
    assert m.MIN_SEEDS == 3 and np.isnan(m.mean_interval([1.0, 2.0])[1])


def test_one_seed_gives_nan_interval_not_zero():
    mean, low, high = m.mean_interval([0.3])
    assert mean == 0.3 and np.isnan(low) and np.isnan(high)
    assert all(np.isnan(m.mean_interval([])))


def test_missing_baseline_gives_nan_gain_and_unknown_worse_off(small):
    metrics, ledger, _ = small
    no_baseline = metrics[metrics["scheme"] != "isolated"]
    assert m.gain_table(no_baseline)["gain"].isna().all()
    table = m.summary(no_baseline, ledger)
    assert np.isnan(table.loc[0, "mean_gain"]) and table.loc[0, "worse_off"] is pd.NA


def test_ambiguous_baseline_warns_and_averages(small):
    metrics, _, _ = small
    extra = metrics[metrics["run_id"] == "isolated-0"].assign(run_id="isolated-0-lr2")
    extra.loc[(extra["institution"] == "A") & (extra["round"] == 1) & (extra["metric"] == "accuracy"), "value"] = 0.50
    with pytest.warns(UserWarning, match="several isolated runs"):
        gains = m.gain_table(pd.concat([metrics, extra]))
    a0 = gains[(gains["institution"] == "A") & (gains["seed"] == 0)]["gain"].item()
    assert a0 == pytest.approx((0.70 - 0.55) * 100, abs=TOL)  # baseline = mean of 0.60 and 0.50


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 0, 0, 1], 0.75),  # one holds everything: (n-1)/n with the n^2 population form
        ([1, 1, 1], 0.0),
        ([0, 0, 0], 0.0),  # no gains at all is perfectly even, not undefined
        ([2, 4, 6], 8 / 36),  # textbook: sum|xi-xj| = 16, 2 n^2 mean = 72
        ([-1, 1], 0.5),  # mixed signs: MAD 1 / (2 x mean|x| 1)
    ],
)
def test_gini_on_known_vectors(values, expected):
    assert m.gini(values) == pytest.approx(expected, abs=TOL)


def test_gini_matches_sorted_formula_for_nonnegative_and_stays_in_unit_interval():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=50)
    s = np.sort(x)
    classic = 2 * np.sum(np.arange(1, 51) * s) / (50 * s.sum()) - 51 / 50
    assert m.gini(x) == pytest.approx(classic, rel=1e-9)
    mixed = rng.normal(size=200)
    assert 0 <= m.gini(mixed) <= 1
    assert m.gini(mixed) == pytest.approx(m.gini(-mixed), rel=1e-12)  # sign-symmetric, as documented
    assert np.isnan(m.gini([]))


def test_fairness_on_small_tables(small):
    fair = m.fairness_table(small[0]).set_index("scheme")
    fed = fair.loc["fedavg"]
    assert fed["worst_institution"] == "B" and fed["worst_gain"] == pytest.approx(-3.0, abs=TOL)
    assert fed["gain_std"] == pytest.approx(5.25, abs=TOL)  # population sd of (7.5, -3)
    assert fed["gain_gini"] == pytest.approx(0.5, abs=TOL)  # |7.5+3| x 2 / 4 = 5.25; / (2 x 5.25)
    assert fed["share_better_off"] == 0.5
    assert fed["accuracy_parity"] == pytest.approx(0.77 - 0.725, abs=TOL)  # y: (0.78+0.76)/2, x: (0.70+0.75)/2
    assert fed["worst_discipline"] == "x"
    assert fair.loc["isolated", "gain_gini"] == 0.0 and fair.loc["isolated", "worst_gain"] == 0.0


def test_summary_columns_and_values(small):
    table = m.summary(*small[:2])
    assert list(table.columns) == ["scheme", "seeds", "global_accuracy", "mean_accuracy", "worst_accuracy",
                                   "mean_gain", "mean_gain_low", "mean_gain_high", "mean_gain_note", "worse_off",
                                   "significantly_worse_off", "megabytes", "simulated_duration"]
    assert list(table["scheme"]) == ["isolated", "fedavg"]
    assert list(table["seeds"]) == [2, 2] and table["mean_gain_low"].isna().all()  # two seeds: no interval
    fed = table.set_index("scheme").loc["fedavg"]
    assert fed["global_accuracy"] == pytest.approx(0.75, abs=TOL)
    assert fed["mean_accuracy"] == pytest.approx((0.74 + 0.755) / 2, abs=TOL)
    assert fed["worst_accuracy"] == pytest.approx((0.70 + 0.75) / 2, abs=TOL)
    assert fed["mean_gain"] == pytest.approx((4.0 + 0.5) / 2, abs=TOL)  # per run (10-2)/2 and (5-4)/2, in points
    assert fed["worse_off"] == 1
    assert fed["megabytes"] == pytest.approx(6.0, abs=TOL)
    iso = table.set_index("scheme").loc["isolated"]
    assert pd.isna(iso["global_accuracy"]) and iso["mean_gain"] == 0 and iso["worse_off"] == 0 and iso["megabytes"] == 0


def test_selected_rounds_pick_best_validation_accuracy_per_institution():
    # Round-by-round scores of one run: A is best on validation in round 1, B in round 2 (tie on accuracy: lower loss).
    rows = []
    for r, (va, vl, acc) in enumerate([(0.5, 1.0, 0.50), (0.8, 0.6, 0.70), (0.7, 0.5, 0.90)]):
        rows += [{"run_id": "x", "institution": "A", "round": r, "metric": k, "value": v}
                 for k, v in (("val_accuracy", va), ("val_loss", vl), ("accuracy", acc))]
    for r, (va, vl, acc) in enumerate([(0.5, 1.0, 0.40), (0.6, 0.9, 0.45), (0.6, 0.7, 0.55)]):
        rows += [{"run_id": "x", "institution": "B", "round": r, "metric": k, "value": v}
                 for k, v in (("val_accuracy", va), ("val_loss", vl), ("accuracy", acc))]
    rows.append({"run_id": "x", "institution": "C", "round": 2, "metric": "accuracy", "value": 0.3})  # no validation rows
    metrics = pd.DataFrame(rows).assign(scheme="fedavg", scenario="s", seed=0, discipline="d")
    picked = metrics.assign(selected=m.select_rounds(metrics, "best_val"))
    chosen = picked[picked["selected"]].groupby("institution")["round"].unique().map(list).to_dict()
    assert chosen == {"A": [1], "B": [2], "C": [2]}  # C keeps its last round
    final = m.final_table(picked).set_index("institution")["accuracy"]
    assert final.to_dict() == {"A": 0.70, "B": 0.55, "C": 0.3}  # the test score at the chosen round, never the best test
    last = m.final_table(metrics.assign(selected=m.select_rounds(metrics, "last"))).set_index("institution")
    assert last["accuracy"].to_dict() == {"A": 0.90, "B": 0.55, "C": 0.3}
    assert m.final_table(metrics).set_index("institution")["accuracy"].to_dict() == {"A": 0.90, "B": 0.55, "C": 0.3}


def test_summary_adds_scenario_column_only_for_several_scenarios(small):
    metrics, ledger, _ = small
    other = [t.assign(scenario="t", run_id=t["run_id"] + "-t") for t in (metrics, ledger)]
    table = m.summary(pd.concat([metrics, other[0]]), pd.concat([ledger, other[1]]))
    assert list(table.columns)[0] == "scenario" and len(table) == 4


def test_costs_per_scheme(small):
    costs = m.cost_table(*small[:2]).set_index("scheme")
    fed = costs.loc["fedavg"]
    assert fed["bytes_up"] == 2e6 and fed["bytes_down"] == 4e6 and fed["megabytes"] == 6.0
    assert fed["compute_seconds"] == 3.0 and fed["simulated_seconds"] == 5.0
    assert fed["simulated_duration"] == 3.0  # the slower institution's 3 s in the only round
    assert fed["accuracy_per_mb"] == pytest.approx(0.7475 / 6, abs=TOL)
    assert np.isnan(costs.loc["isolated", "accuracy_per_mb"])  # nothing exchanged: undefined, not infinite
    assert costs["pareto"].all()  # isolated is cheapest, fedavg most accurate
    assert costs.loc["fedavg", "runs"] == 2


def test_pareto_front_mask():
    df = pd.DataFrame({
        "accuracy": [0.8, 0.9, 0.7, 0.9, 0.6, np.nan],
        "megabytes": [10, 20, 15, 25, 0, 1],
        "epsilon": [np.nan] * 6,
    })
    mask = m.pareto_front(df, maximise=["accuracy"], minimise=["megabytes", "epsilon"])
    # C (0.7, 15) is dominated by A; D (0.9, 25) by B; the NaN row never makes the front
    assert mask.tolist() == [True, True, False, False, True, False]
    df["epsilon"] = [5, 5, 5, 1, 5, 5]  # now D is the most private: it joins the front
    assert m.pareto_front(df, maximise=["accuracy"], minimise=["megabytes", "epsilon"]).tolist() == [
        True, True, False, True, True, False]
    with pytest.raises(ValueError):
        m.pareto_front(df, maximise=["accuracy"], minimise=["accuracy"])


def test_pareto_front_keeps_ties():
    df = pd.DataFrame({"a": [1.0, 1.0], "b": [2.0, 2.0]})
    assert m.pareto_front(df, maximise=["a"], minimise=["b"]).tolist() == [True, True]


def test_round_curve_falls_back_to_institutions_for_isolated(small):
    curve = m.round_curve(small[0]).set_index(["scheme", "round"])
    assert curve.loc[("fedavg", 1), "mean"] == pytest.approx(0.75, abs=TOL)
    assert curve.loc[("fedavg", 1), "low"] == pytest.approx(0.74, abs=TOL)
    assert curve.loc[("isolated", 1), "source"] == "mean of institutions"
    assert curve.loc[("isolated", 1), "mean"] == pytest.approx(0.725, abs=TOL)


def test_scheme_order_puts_baseline_first_and_pooled_last():
    assert m.scheme_order(["pooled", "fedprox", "isolated", "fedavg"]) == ["isolated", "fedavg", "fedprox", "pooled"]


def test_empty_tables_do_not_crash():
    empty_m, empty_l = frame("metrics", []), frame("ledger", [])
    assert m.summary(empty_m, empty_l).empty
    assert m.cost_table(empty_m, empty_l).empty
    assert m.fairness_table(empty_m).empty


def test_epsilon_is_the_largest_spend_and_enters_the_front(small):
    metrics, ledger, _ = small
    ledger = ledger.copy()
    ledger.loc[(ledger["run_id"] == "fedavg-0") & (ledger["institution"] == "A"), "epsilon"] = 2.0
    ledger.loc[(ledger["run_id"] == "fedavg-0") & (ledger["institution"] == "B"), "epsilon"] = 3.0
    ledger.loc[ledger["run_id"] == "fedavg-1", "epsilon"] = 1.0
    costs = m.cost_table(metrics, ledger).set_index("scheme")
    assert costs.loc["fedavg", "epsilon"] == pytest.approx(2.0)  # per run max (3, 1), mean over seeds
    assert np.isnan(costs.loc["isolated", "epsilon"])  # shown as "no noise"
    assert costs.loc["isolated", "pareto"] and costs.loc["fedavg", "pareto"]  # isolated: nothing leaves, epsilon 0


def _clone(tables, scheme: str, accuracy_shift: float, epsilon: float):
    """Copy the fedavg runs of (metrics, ledger) as another scheme, shifting accuracy and setting epsilon."""
    metrics, ledger = (t[t["scheme"] == "fedavg"].assign(scheme=scheme, run_id=lambda d: d["run_id"] + scheme) for t in tables)
    return metrics.assign(value=metrics["value"] + accuracy_shift), ledger.assign(epsilon=epsilon)


def test_sharing_without_noise_counts_as_unbounded_epsilon_on_the_front(small):
    metrics, ledger, _ = small
    dp = _clone((metrics, ledger), "dp", -0.01, 1.0)  # same bytes, a little less accurate, private
    leaky = _clone((metrics, ledger), "leaky", -0.02, np.nan)  # same bytes, less accurate, no noise
    costs = m.cost_table(pd.concat([metrics, dp[0], leaky[0]]), pd.concat([ledger, dp[1], leaky[1]])).set_index("scheme")
    # fedavg has no noise but the best accuracy: on the front (NaN read as unbounded, not dropped);
    # leaky is fedavg made worse: dominated; isolated exchanges nothing, so its epsilon counts as 0.
    assert costs["pareto"].to_dict() == {"isolated": True, "dp": True, "fedavg": True, "leaky": False}
