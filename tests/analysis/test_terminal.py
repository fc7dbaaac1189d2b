"""The summary the terminal prints after a compare: an interval, or the reason there is none, never NaN."""

from __future__ import annotations

from analysis import metrics as m
from analysis.terminal import summary_text
from conftest import small_tables


def test_with_one_seed_the_terminal_says_too_few_seeds_instead_of_nan():
    # Prepare: the small tables' seed 0 only (as a compare with seeds=1 leaves them)
    metrics, ledger, _ = small_tables()
    table = m.summary(metrics[metrics["seed"] == 0], ledger[ledger["seed"] == 0])
    # Execute
    text = summary_text(table)
    # Assert
    assert "NaN" not in text and "nan" not in text
    fedavg = next(line for line in text.splitlines() if line.strip().startswith("fedavg"))
    assert "too few seeds (n < 3)" in fedavg
    assert "0 (baseline)" in text


def test_an_interval_leaving_the_possible_range_prints_too_uncertain():
    # Prepare: a summary row whose interval was left blank as impossible
    metrics, ledger, _ = small_tables()
    table = m.summary(metrics, ledger)
    table.loc[table["scheme"] == "fedavg", "mean_gain_note"] = "too uncertain: the 95% interval leaves the possible range"
    # Execute
    text = summary_text(table)
    # Assert
    assert "too uncertain" in text and "NaN" not in text
