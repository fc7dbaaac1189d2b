"""The commands a user types, run as subprocesses on tiny budgets (CleanRL style)."""

import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def sim(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_compare_prints_and_writes_the_summary_table(tmp_path):
    out = tmp_path / "cmp"
    proc = sim("sim.compare", "smoke=true", "cluster.num_cpus=2", f"hydra.run.dir={out}")
    table = pd.read_csv(out / "summary.csv")
    assert list(table.columns) == ["scheme", "seeds", "global_accuracy", "mean_accuracy", "worst_accuracy",
                                   "mean_gain", "mean_gain_low", "mean_gain_high", "mean_gain_note", "worse_off",
                                   "significantly_worse_off", "megabytes", "simulated_duration"]
    assert (table.seeds == 3).all()  # three seeds by default: every gain gets an interval
    assert set(table.scheme) == {"isolated", "pooled", "fedavg", "fedprox", "scaffold"} and table.scheme.iloc[0] == "isolated"
    assert "tuning: none; every scheme ran at its config settings" in proc.stdout  # plainly: not tuned
    assert "round 3/3" in proc.stderr + proc.stdout  # one progress line per round
    assert "mean_gain_95%" in proc.stdout and "NaN" not in proc.stdout  # an interval, or why there is none
    assert (out / "metrics.parquet").exists() and (out / "ledger.parquet").exists()


def test_generated_population_runs_pooled(tmp_path):
    out = tmp_path / "pop"
    proc = sim("sim", "scheme=isolated", "scenario.num_institutions=20", "smoke=true", "cluster.num_cpus=2",
               f"hydra.run.dir={out}")
    assert "pooled host actor" in proc.stderr + proc.stdout
    institutions = pd.read_parquet(out / "institutions.parquet")
    assert len(institutions) == 20
