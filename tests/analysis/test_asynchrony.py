"""Time to the reference scheme's final accuracy on the simulated clock (analysis/asynchrony.py)."""

from __future__ import annotations

import math

import pandas as pd

from analysis.asynchrony import time_to_accuracy


def tables(scheme: str, accuracies: list[float], times: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Global accuracy at rounds 0..n and the clock at the end of rounds 1..n, for seed 0."""
    m = pd.DataFrame({"scheme": scheme, "seed": 0, "round": range(len(accuracies)), "institution": "global",
                      "metric": "accuracy", "value": accuracies})
    led = pd.DataFrame({"scheme": scheme, "seed": 0, "round": range(1, len(times) + 1), "sim_time": times})
    return m, led


def test_time_to_target_is_the_first_scored_time_at_or_above_the_reference_final_accuracy() -> None:
    # Prepare: fedavg ends at 0.8 after 30 s (reaching it at 20 s); fast gets there at 4 s; slow never does
    parts = [tables("fedavg", [0.1, 0.5, 0.8, 0.8], [10.0, 20.0, 30.0]),
             tables("fast", [0.1, 0.7, 0.81, 0.79], [2.0, 4.0, 6.0]),
             tables("slow", [0.1, 0.2, 0.3], [40.0, 80.0])]
    metrics, ledger = (pd.concat([p[i] for p in parts]) for i in (0, 1))
    # Execute
    out = time_to_accuracy(metrics, ledger).set_index("scheme")
    # Assert
    assert out.loc["fedavg", "time_to_target"] == 20.0 and out.loc["fedavg", "end_time"] == 30.0
    assert out.loc["fast", "time_to_target"] == 4.0 and out.loc["fast", "final_accuracy"] == 0.79
    assert math.isnan(out.loc["slow", "time_to_target"]) and (out.target == 0.8).all()
    # a target of half fedavg's final accuracy: fedavg reaches 0.5 at 10 s, slow never reaches 0.4
    half = time_to_accuracy(metrics, ledger, fraction=0.5).set_index("scheme")
    assert half.loc["fedavg", "time_to_target"] == 10.0 and half.loc["fast", "time_to_target"] == 2.0
    assert math.isnan(half.loc["slow", "time_to_target"])


def test_run_duration_is_the_clock_not_the_sum_of_each_rounds_slowest() -> None:
    # Prepare: two asynchronous rounds; each dispatches an institution for 5 s, but the arrivals land at 1 s and 2 s
    from analysis.metrics import run_costs

    ledger = pd.DataFrame({"run_id": "r", "scheme": "fedasync", "scenario": "s", "seed": 0, "round": [1, 2],
                           "institution": ["a", "b"], "participated": True, "bytes_up": 1, "bytes_down": 1,
                           "compute_seconds": 0.0, "simulated_seconds": 5.0, "epsilon": math.nan,
                           "sim_time": [1.0, 2.0]})
    # Execute / Assert: the clock's 2 s (a table without sim_time falls back to the sum of the maxima, 10 s)
    assert run_costs(ledger)["simulated_duration"].tolist() == [2.0]
    assert run_costs(ledger.drop(columns="sim_time"))["simulated_duration"].tolist() == [10.0]


def test_mean_staleness_of_the_updates_merged_is_a_run_cost_and_nan_for_synchronous_ledgers() -> None:
    from analysis.metrics import run_costs

    # Prepare: three arrivals 0, 2 and 4 steps stale, and rows of institutions still training (NaN)
    ledger = pd.DataFrame({"run_id": "r", "scheme": "fedbuff", "scenario": "s", "seed": 0, "round": [1, 1, 2, 3],
                           "institution": ["a", "b", "a", "b"], "participated": True, "bytes_up": 1, "bytes_down": 1,
                           "compute_seconds": 0.0, "simulated_seconds": 1.0, "epsilon": math.nan,
                           "staleness": [0.0, math.nan, 2.0, 4.0]})
    # Execute / Assert
    assert run_costs(ledger)["staleness"].tolist() == [2.0]
    assert run_costs(ledger.assign(staleness=math.nan))["staleness"].isna().all()
    assert run_costs(ledger.drop(columns="staleness"))["staleness"].isna().all()  # ledgers from before the column
