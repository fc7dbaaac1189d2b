"""Intervals that respect what a figure can be, and the reason printed wherever one is missing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import metrics as m
from analysis.certainty import TOO_FEW, TOO_UNCERTAIN, bounded_interval
from sim.core.results import frame


def seeded(alone: float, joined: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two institutions that reach ``alone`` on their own and ``joined[k]`` under fedavg in seed k (one round)."""
    metrics, ledger = [], []
    for scheme in ("isolated", "fedavg"):
        for seed, acc in enumerate(joined):
            run = {"run_id": f"{scheme}-{seed}", "scheme": scheme, "scenario": "s", "seed": seed}
            value = alone if scheme == "isolated" else acc
            for name in ("a", "b"):
                for metric, v in (("accuracy", value), ("loss", 1 - value)):
                    metrics.append({**run, "round": 1, "institution": name, "discipline": "x", "metric": metric, "value": v})
                ledger.append({**run, "round": 1, "institution": name, "participated": True, "bytes_up": 0,
                               "bytes_down": 0, "compute_seconds": 1.0, "simulated_seconds": 1.0, "samples": 10,
                               "epsilon": np.nan})
    return frame("metrics", metrics), frame("ledger", ledger)


def test_an_interval_reaching_gains_no_accuracy_can_give_is_not_shown_and_says_why():
    # Prepare: alone 50%; joined 5%, 50%, 95% by seed: gains -45, 0, +45 points, whose t-interval is about +-112
    # points, while a mean gain against 50% can only lie between -50 and +50
    metrics, ledger = seeded(0.5, [0.05, 0.50, 0.95])
    # Execute
    summary = m.summary(metrics, ledger).set_index("scheme")
    per_institution = m.gain_summary(m.gain_table(metrics))
    # Assert: no impossible bounds anywhere, and a reason in their place
    assert summary.loc["fedavg", "mean_gain"] == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(summary.loc["fedavg", "mean_gain_low"]) and np.isnan(summary.loc["fedavg", "mean_gain_high"])
    assert summary.loc["fedavg", "mean_gain_note"] == TOO_UNCERTAIN
    assert per_institution["gain_low"].isna().all() and (per_institution["gain_note"] == TOO_UNCERTAIN).all()


def test_an_interval_inside_the_possible_range_is_shown_with_no_note():
    # Prepare: gains +4, +5, +6 points against 50%
    metrics, ledger = seeded(0.5, [0.54, 0.55, 0.56])
    # Execute
    row = m.summary(metrics, ledger).set_index("scheme").loc["fedavg"]
    # Assert: t(0.975, 2) = 4.302653, sd 1, so 5 +- 2.48
    assert row["mean_gain_low"] == pytest.approx(5 - 4.302653 / np.sqrt(3), abs=1e-4)
    assert row["mean_gain_high"] == pytest.approx(5 + 4.302653 / np.sqrt(3), abs=1e-4)
    assert row["mean_gain_note"] == ""


def test_an_accuracy_interval_never_leaves_zero_to_one():
    # Prepare: accuracies 0.02, 0.5, 0.98 (a t-interval of about -1.0 to 2.0)
    values = [0.02, 0.5, 0.98]
    # Execute
    mean, low, high, note = bounded_interval(values, 0.0, 1.0)
    # Assert
    assert mean == 0.5 and np.isnan(low) and np.isnan(high) and note == TOO_UNCERTAIN


def test_with_fewer_than_three_seeds_the_note_says_too_few_seeds():
    # Prepare
    metrics, ledger = seeded(0.5, [0.54])
    # Execute
    row = m.summary(metrics, ledger).set_index("scheme").loc["fedavg"]
    # Assert
    assert np.isnan(row["mean_gain_low"]) and row["mean_gain_note"] == TOO_FEW == "too few seeds (n < 3)"

