"""The drift decomposition of FedAvg's loss and the report's plain word on tuning, on hand-built tables."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import metrics as m
from analysis.drift import drift_findings, drift_table
from analysis.findings import tuning_findings
from sim.core.results import frame

NAMES = ["a_lab", "b_lab", "c_lab", "d_lab", "e_lab", "f_lab"]


def tables(alone: list[float], joined: dict[str, list[float]], seeds=(0, 1, 2), spread: float = 0.0):
    """Metrics in the results schema: one round, each institution's accuracy alone and under each scheme; with
    ``spread`` a joined scheme's accuracies move by -spread, 0, +spread, ... from seed to seed (same mean)."""
    rows = []
    for scheme, base in {"isolated": alone, **joined}.items():
        for k, seed in enumerate(seeds):
            shift = 0.0 if scheme == "isolated" else spread * (k % 3 - 1) * (1 + list(joined).index(scheme) if scheme in joined else 1)
            run = {"run_id": f"{scheme}-{seed}", "scheme": scheme, "scenario": "s", "seed": seed, "round": 1}
            for name, acc in zip(NAMES, base):
                for metric, value in (("accuracy", acc + shift), ("loss", 1 - acc - shift)):
                    rows.append({**run, "institution": name, "discipline": name[0], "metric": metric, "value": value})
    return frame("metrics", rows), None

ALONE = [0.80, 0.80, 0.80, 0.80, 0.80, 0.80]
JOINED = {"fedavg": [0.50, 0.70, 0.80, 0.80, 0.80, 0.90],   # a_lab and b_lab lose under FedAvg
          "scaffold": [0.80, 0.70, 0.80, 0.80, 0.80, 0.90],  # a_lab's loss is all drift
          "pooled": [0.80, 0.60, 0.80, 0.80, 0.80, 0.90]}    # b_lab's loss is the scenario: pooled is below alone too


def test_fedavgs_gain_is_scenario_less_drift_less_rest_for_every_institution():
    metrics, _ = tables(ALONE, JOINED, spread=0.01)
    table = drift_table(m.gain_table(metrics)).set_index("institution")
    total = table["scenario_gap"] - table["drift_gap"] - table["rest_gap"]
    pd.testing.assert_series_equal(total, table["fedavg_gain"], check_names=False, atol=1e-9)
    assert table.loc["a_lab", "drift_gap"] == pytest.approx(30.0) and table.loc["b_lab", "scenario_gap"] == pytest.approx(-20.0)
    assert set(table["corrector"]) == {"scaffold"}


def test_the_sentence_calls_drift_and_scenario_by_name_only_when_their_intervals_exclude_zero():
    # Three seeds with the same numbers: every interval has zero width, so every non-zero gap is significant
    metrics, _ = tables(ALONE, JOINED)
    (topic, text), = drift_findings(drift_table(m.gain_table(metrics)))
    assert topic == "Drift or scenario"
    assert text.startswith("FedAvg leaves 2 of 6 institutions below training alone (2 significantly); for 1 of them "
                           "scaffold recovers a significant part of the loss (client drift), and for 1 even pooling")
    assert "a_lab, −30.0 points (95% interval −30.0 to −30.0) under FedAvg: scaffold recovers +30.0 points" in text
    assert "b_lab" in text and "pooled data is −20.0 points (95% interval −20.0 to −20.0) against alone: the scenario" in text
    # Two seeds: no interval, so neither is stated as fact
    metrics, _ = tables(ALONE, JOINED, seeds=(0, 1))
    (_, text), = drift_findings(drift_table(m.gain_table(metrics)))
    assert "0 of them" in text and "client drift." not in text.split(").", 1)[1]
    assert "no drift established" in text and "too few seeds" in text


def test_without_a_drift_corrector_there_is_no_decomposition():
    metrics, _ = tables(ALONE, {k: v for k, v in JOINED.items() if k != "scaffold"})
    assert drift_table(m.gain_table(metrics)).empty and drift_findings(drift_table(m.gain_table(metrics))) == []


def test_the_report_says_plainly_whether_schemes_were_tuned():
    (_, untuned), = tuning_findings(pd.DataFrame(), [{"tune": 0, "schemes": ["fedavg"]}])
    assert untuned.startswith("none: every scheme ran at its config settings (tune=0)")
    tuned = pd.DataFrame([{"scheme": "fedavg", "trials": 8, "chosen_trial": 3, "val_score": 0.9, "config_val_score": 0.8,
                           "settings": "training.lr=0.1", "chosen_on": "validation", "seed": 0}])
    (_, said), = tuning_findings(tuned, [{"tune": 8}])
    assert "the same budget of 8 Ray Tune trials of its own settings on seed 0" in said
    assert "test data never chose them" in said and "fedavg: training.lr=0.1, validation accuracy 90.0%" in said
    assert tuning_findings(pd.DataFrame(), [{"rounds": 20}]) == []  # a run or sweep: no compare, nothing to say


def test_the_results_page_names_the_command_the_tuning_the_drift_and_the_gap_closed(tmp_path):
    from conftest import DEMO_CONFIG, demo_tables, write_run

    from analysis.__main__ import main

    # Prepare: an untuned compare of the default scenario and a "tuned" one (its tuned.csv beside its tables)
    untuned = write_run(tmp_path / "untuned", *demo_tables(rounds=3), config={**DEMO_CONFIG, "tune": 0})
    metrics, ledger, institutions = demo_tables(rounds=3)
    metrics.loc[(metrics["scheme"] == "fedavg") & (metrics["institution"] != "global"), "value"] += 0.01
    tuned = write_run(tmp_path / "tuned", metrics, ledger, institutions, config={**DEMO_CONFIG, "tune": 4})
    pd.DataFrame([{"scheme": s, "trials": 4, "chosen_trial": k % 2, "val_score": 0.9, "config_val_score": 0.85,
                   "diverged": 0, "settings": "training.lr=0.1", "chosen_on": "validation", "values_json": "{}", "seed": 0}
                  for k, s in enumerate(["isolated", "fedavg", "fedprox", "fedsgd", "pooled"])]).to_csv(tuned / "tuned.csv", index=False)
    # Execute
    page = tmp_path / "docs" / "default-scenario.md"
    assert main(["page", str(tuned), "--command", "python -m sim.compare tune=4", "--untuned", str(untuned),
                 "--out", str(page)]) == 0
    text = page.read_text()
    # Assert: the command, the plain word on tuning, the drift split against FedSGD (no SCAFFOLD here), the gap closed
    assert "```bash\npython -m sim.compare tune=4\n```" in text
    assert "the same budget of 4 Ray Tune trials of its own settings on seed 0" in text and "test data never chose them" in text
    assert "drift = fedsgd − FedAvg" in text and "## Tuning against the config settings" in text
    row = next(line for line in text.splitlines() if line.startswith("| fedavg |") and "%" in line.split("|")[-2])
    assert row.split("|")[-2].strip() != "0%"  # fedavg moved 1 point closer to pooled
