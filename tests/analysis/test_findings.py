"""Wording of the findings on hand-built tables: quantifiers follow the numbers, never 'each' for a few."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from analysis import metrics as m
from analysis.findings import findings, institutions_phrase, selection_rule
from sim.core.results import frame

NAMES = ["a_lab", "b_lab", "c_lab", "d_lab", "e_lab", "f_lab"]


def tables(alone: list[float], joined: dict[str, list[float]], seeds=(0, 1, 2), spread: float = 0.0,
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics and ledger in the results schema: one round, each institution's accuracy alone and under each scheme.

    Every seed gets the same accuracies, so a gain is exact and its interval has zero width; with ``spread`` the
    joined schemes' accuracies move by -spread, 0, +spread, ... from seed to seed (same mean, a wider interval).
    """
    metrics, ledger = [], []
    for scheme, base in {"isolated": alone, **joined}.items():
        for k, seed in enumerate(seeds):
            shift = 0.0 if scheme == "isolated" else spread * (k % 3 - 1)
            accuracies = [a + shift for a in base]
            run = {"run_id": f"{scheme}-{seed}", "scheme": scheme, "scenario": "s", "seed": seed}
            for name, acc in zip(NAMES, accuracies):
                metrics.append({**run, "round": 1, "institution": name, "discipline": name[0], "metric": "accuracy", "value": acc})
                metrics.append({**run, "round": 1, "institution": name, "discipline": name[0], "metric": "loss", "value": 1 - acc})
                sent = 0 if scheme == "isolated" else 1_000_000
                ledger.append({**run, "round": 1, "institution": name, "participated": True, "bytes_up": sent,
                               "bytes_down": sent, "compute_seconds": 1.0, "simulated_seconds": 1.0, "samples": 10,
                               "epsilon": float("nan")})
            metrics.append({**run, "round": 1, "institution": "global", "discipline": "global", "metric": "accuracy",
                            "value": sum(accuracies) / len(accuracies)})
    return frame("metrics", metrics), frame("ledger", ledger)


def sentences(metrics: pd.DataFrame, ledger: pd.DataFrame) -> dict[str, str]:
    """The findings of these tables, topic -> sentence."""
    gains = m.gain_summary(m.gain_table(metrics))
    return dict(findings(m.summary(metrics, ledger), gains, m.fairness_table(metrics), m.cost_table(metrics, ledger)))


ALONE = [0.50, 0.80, 0.80, 0.80, 0.80, 0.80]


def test_a_mean_gain_lifted_by_one_institution_is_not_a_gain_for_each():
    # Prepare: a_lab gains 30 points, the five others lose 1 to 2 points: the mean is still +3.8.
    joined = {"pooled": [0.80, 0.79, 0.78, 0.79, 0.79, 0.78]}
    # Execute
    said = sentences(*tables(ALONE, joined))
    # Assert
    headline = said["Highest mean gain"]
    assert "on average" in headline and "+3.8 accuracy points" in headline
    assert "1 of 6 institutions gains, significantly; 5 of 6 institutions are worse off, 5 significantly" in headline
    assert "most institutions lose" in headline  # every interval excludes zero here: stated as a fact
    assert not re.search(r"\b(each|every|all)\b", headline)
    assert "5 of 6 institutions are worse off" in said["Who loses by joining"]
    assert "1 of 6 institutions is better off" in said["Fairness"]


def test_a_gain_for_every_institution_says_all():
    joined = {"fedavg": [0.55, 0.82, 0.81, 0.85, 0.90, 0.81]}
    said = sentences(*tables(ALONE, joined))
    assert "all 6 institutions gain" in said["Highest mean gain"]
    assert "worse off" not in said["Highest mean gain"]
    assert said["Who loses by joining"] == "no institution ends up worse off by joining, under any scheme."
    assert "all 6 institutions are better off" in said["Fairness"]


def test_no_gain_on_average_counts_who_still_gains():
    joined = {"fedavg": [0.60, 0.70, 0.70, 0.70, 0.70, 0.70]}
    said = sentences(*tables(ALONE, joined))
    assert "Highest mean gain" not in said
    text = said["No gain on average"]
    assert "no scheme beats training alone on average" in text and "1 of 6 institutions gains" in text
    assert "all 5 of" not in said["Who loses by joining"] and "5 of 6 institutions are worse off" in said["Who loses by joining"]


def test_the_best_scheme_is_named_by_its_config_name_and_losers_under_every_scheme():
    joined = {"fed_avg_full": [0.40, 0.70, 0.70, 0.70, 0.70, 0.70], "pooled": [0.60, 0.81, 0.81, 0.81, 0.81, 0.81]}
    said = sentences(*tables(ALONE, joined))
    assert said["Highest mean gain"].startswith("pooled gains the most on average")
    assert "under fed_avg_full, all 6 institutions are worse off" in said["Who loses by joining"]


def test_losses_whose_intervals_include_zero_are_counted_as_none_significant_never_stated_flatly():
    # Prepare: every institution loses 1 to 2 points on average, but the seeds spread 3 points either way
    joined = {"fedavg": [0.49, 0.79, 0.78, 0.79, 0.78, 0.79]}
    # Execute
    said = sentences(*tables(ALONE, joined, spread=0.03))
    # Assert: the count comes with how sure it is, in the losers' sentence and in the headline alike
    assert "under fedavg, all 6 institutions are worse off, none significantly" in said["Who loses by joining"]
    headline = said["No gain on average"]
    assert "no scheme beats training alone on average" in headline and "not significant" in headline
    assert "all 6 institutions are worse off, none significantly" in headline


def test_a_mean_gain_whose_interval_includes_zero_is_not_headlined_as_a_gain():
    # Prepare: +3.2 points on average, seeds 8 points apart either way
    joined = {"fedavg": [0.55, 0.84, 0.82, 0.83, 0.83, 0.82]}
    # Execute
    said = sentences(*tables(ALONE, joined, spread=0.08))
    # Assert: named as the highest mean, and said to be not significant, with its interval
    text = said["Highest mean gain"]
    assert text.startswith("fedavg has the highest mean gain, +3.2 accuracy points")
    assert "not significant: its 95% interval, " in text and "includes zero" in text and "gains the most" not in text


def test_with_one_seed_nothing_is_significant_and_the_sentences_say_why():
    # Prepare
    joined = {"fedavg": [0.49, 0.79, 0.78, 0.79, 0.78, 0.79]}
    # Execute
    said = sentences(*tables(ALONE, joined, seeds=(0,)))
    # Assert
    assert "all 6 institutions are worse off, none significantly" in said["Who loses by joining"]
    assert "too few seeds (n < 3)" in said["Who loses by joining"]


@pytest.mark.parametrize("seeds, expected", [
    ((0,), "figures are means over 1 seed: too few seeds for an interval (n < 3)"),
    ((0, 1), "figures are means over 2 seeds: too few seeds for an interval (n < 3)"),
    ((0, 1, 2), "figures are means over 3 seeds; intervals are 95% t-intervals over seeds"),
])
def test_certainty_says_once_whether_there_are_intervals(seeds, expected):
    joined = {"pooled": [0.80, 0.79, 0.78, 0.79, 0.79, 0.78]}
    said = sentences(*tables(ALONE, joined, seeds=seeds))
    assert said["Certainty"].startswith(expected)
    assert ("95% interval" in said["Highest mean gain"]) == (len(seeds) >= m.MIN_SEEDS)


@pytest.mark.parametrize("k, n, expected", [
    (6, 6, "all 6 institutions gain"), (0, 6, "none of the 6 institutions gains"), (1, 6, "1 of 6 institutions gains"),
    (5, 6, "5 of 6 institutions gain"), (1, 1, "the only institution gains"), (0, 1, "no institution gains"),
])
def test_institutions_phrase_quantifiers(k, n, expected):
    assert institutions_phrase(k, n, "gain") == expected


def test_selection_rule_is_read_from_the_configs():
    assert "the last round (results.select=last)" in selection_rule([{}])  # runs from before model selection
    best = selection_rule([{"results": {"select": "best_val"}}])
    assert "own validation split" in best and "(results.select=best_val)" in best
    both = selection_rule([{"results": {"select": "best_val"}}, {"results": {"select": "last"}}])
    assert "choose differently" in both and "results.select=last" in both and "results.select=best_val" in both
