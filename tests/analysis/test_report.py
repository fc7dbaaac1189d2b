"""The report and the command line, built from hand-made tables written as parquet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.contribution import contribution_table
from analysis.report import build_report
from analysis.runs import RunDirError, find_run_dirs, load_results, run_state
from conftest import DEMO_CONFIG, demo_tables, small_tables, write_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> Path:
    """One report of the 5-scheme, 3-seed demo compare, built once for the tests that only read it."""
    root = tmp_path_factory.mktemp("demo")
    run = write_run(root / "compare", *demo_tables(rounds=6), config={**DEMO_CONFIG, "rounds": 6}, state="complete")
    return build_report([run], root / "out")


def test_report_is_one_self_contained_file(demo_report):
    out = demo_report.parent
    path = demo_report
    assert path.name == "report.html"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "tables"]  # one page, tables beside it
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 3  # gains, Pareto, rounds (no contribution given)
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|link|iframe)\b", page) and "@import" not in page and "url(" not in page
    findings = re.search(r'<section id="findings" class="findings">(.*?)</section>', page, re.S)
    assert findings and "Highest gain" in findings.group(1) and "Who loses by joining" in findings.group(1)
    assert "6 institutions from 3 disciplines" in page


def test_report_exports_every_table(demo_report):
    tables = demo_report.parent / "tables"
    for name in ("summary", "gains", "gains_per_run", "fairness", "costs", "accuracy_per_round", "institutions", "runs"):
        assert (tables / f"{name}.csv").is_file() and (tables / f"{name}.parquet").is_file()
    summary = pd.read_csv(tables / "summary.csv")
    assert list(summary.columns) == ["scheme", "global_accuracy", "mean_accuracy", "worst_accuracy", "mean_gain",
                                     "worse_off", "megabytes"]
    assert list(summary["scheme"]) == ["isolated", "fedavg", "fedprox", "fedsgd", "pooled"]


def test_incomplete_runs_are_flagged_and_left_out(small_run, tmp_path):
    metrics, ledger, inst = small_tables()
    later = [t[t["scheme"] == "fedavg"].assign(seed=9, run_id=lambda d: d["run_id"] + "-9") for t in (metrics, ledger, inst)]
    partial = write_run(tmp_path / "partial", *later, state="running")
    path = build_report([small_run, partial], tmp_path / "out")
    page = path.read_text()
    assert "is not complete (state: running) and was left out" in page
    assert "Included" in page and 'class="excluded"' in page  # struck through in the runs table
    gains = pd.read_parquet(tmp_path / "out" / "tables" / "gains_per_run.parquet")
    assert 9 not in set(gains["seed"])  # the unfinished run did not enter any number
    kept = load_results([small_run, partial], include_incomplete=True)
    assert 9 in set(kept.metrics["seed"])


def test_report_with_only_incomplete_runs_says_so(small, tmp_path):
    run = write_run(tmp_path / "run", *small, state="failed")
    page = build_report([run], tmp_path / "out").read_text()
    assert "state: failed" in page and "nothing to analyse" in page


def test_report_notes_a_missing_baseline_seed(small, tmp_path):
    drop = lambda t: t[t["run_id"] != "isolated-1"]  # noqa: E731
    run = write_run(tmp_path / "run", *(drop(t) for t in small))
    page = build_report([run], tmp_path / "out").read_text()
    assert "no isolated run matches scheme &#x27;fedavg&#x27; in scenario &#x27;s&#x27; seed 1" in page


def test_report_with_one_seed_shows_no_interval(tmp_path):
    run = write_run(tmp_path / "run", *demo_tables(seeds=(0,), rounds=2))
    page = build_report([run], tmp_path / "out").read_text()
    assert "no interval (one seed)" in page and "single seed" in page


def test_report_with_contribution(small_run, tmp_path):
    players = ["A", "B"]
    values = {frozenset(c): 0.5 + 0.1 * len(c) for k in range(3) for c in combinations(players, k)}
    path = build_report([small_run], tmp_path / "out", contribution=contribution_table(values, players))
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "Who contributes" in page
    assert (tmp_path / "out" / "tables" / "contribution.csv").is_file()


def test_contribution_report_of_a_single_federated_run_has_no_gain_panel(tmp_path):
    # `python -m analysis contribution RUN/runs/fedavg` reads one scheme: no isolated baseline, no gains.
    metrics, ledger, inst = small_tables()
    keep = lambda t: t[t["scheme"] == "fedavg"]  # noqa: E731
    run = write_run(tmp_path / "run", keep(metrics), keep(ledger), keep(inst))
    players = sorted(set(keep(inst)["institution"]))
    values = {frozenset(c): 0.1 * len(c) for k in range(len(players) + 1) for c in combinations(players, k)}
    page = build_report([run], tmp_path / "out", contribution=contribution_table(values, players)).read_text()
    assert "Who contributes" in page  # before the fix, the empty gain table raised inside the plot


def test_report_without_isolated_says_gains_cannot_be_measured(tmp_path):
    metrics, ledger, inst = small_tables()
    keep = lambda t: t[t["scheme"] != "isolated"]  # noqa: E731
    run = write_run(tmp_path / "run", keep(metrics), keep(ledger), keep(inst))
    page = build_report([run], tmp_path / "out").read_text()
    assert "gains over training alone cannot be measured" in page


def test_run_dirs_resolve_multirun_layout_and_reject_bad_paths(tmp_path, small):
    write_run(tmp_path / "sweep" / "0", *small)
    write_run(tmp_path / "sweep" / "1", *small, state="complete")
    assert [p.name for p in find_run_dirs([tmp_path / "sweep"])] == ["0", "1"]
    with pytest.raises(RunDirError, match="no such directory"):
        find_run_dirs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="no metrics.parquet"):
        find_run_dirs([tmp_path / "empty"])
    (tmp_path / "sweep" / "0" / "status.json").write_text("{not json")
    assert run_state(tmp_path / "sweep" / "0") == "unreadable status.json"


def test_cli_report_prints_path(small_run, capsys):
    assert main(["report", str(small_run)]) == 0
    assert capsys.readouterr().out.strip() == str(small_run / "report.html")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make):
    target = tmp_path / make
    if make == "empty":
        target.mkdir()
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(target) in err


def test_cli_contribution_needs_the_runs_config(small_run, capsys):
    # A hand-built results folder has no runnable config to re-run coalitions from: one line, exit 2.
    assert main(["contribution", str(small_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_python_m_analysis_runs_without_ray_or_agents(small_run):
    # One real subprocess: the entry point works and analysis never pulls in Ray or the agents.
    code = ("import runpy, sys; sys.argv = ['analysis', 'report', sys.argv[1]]\n"
            "try:\n    runpy.run_module('analysis', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'agents')]\n"
            "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, str(small_run)], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("report.html")


def test_report_notes_runs_averaged_as_repeats(small, tmp_path):
    metrics, ledger, inst = small
    again = [t[t["scheme"] == "fedavg"].assign(run_id=lambda d: d["run_id"] + "-lr2") for t in (metrics, ledger, inst)]
    run = write_run(tmp_path / "run", *(pd.concat([t, a]) for t, a in zip(small, again)))
    page = build_report([run], tmp_path / "out").read_text()
    assert "are averaged as if they were repeats" in page
