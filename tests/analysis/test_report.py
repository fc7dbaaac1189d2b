"""The report and the command line, built from hand-made tables written as parquet."""

from __future__ import annotations

import json
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
from analysis.runs import NO_STATUS, RunDirError, find_run_dirs, load_results, run_state
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
    assert findings and "Highest mean gain" in findings.group(1) and "Who loses by joining" in findings.group(1)
    assert "6 institutions from 3 disciplines" in page


def test_report_exports_every_table(demo_report):
    tables = demo_report.parent / "tables"
    for name in ("summary", "gains", "gains_per_run", "fairness", "costs", "accuracy_per_round", "own_accuracy_per_round",
                 "institutions", "runs"):
        assert (tables / f"{name}.csv").is_file() and (tables / f"{name}.parquet").is_file()
    summary = pd.read_csv(tables / "summary.csv")
    assert list(summary.columns) == ["scheme", "seeds", "global_accuracy", "mean_accuracy", "worst_accuracy", "mean_gain",
                                     "mean_gain_low", "mean_gain_high", "mean_gain_note", "worse_off",
                                     "significantly_worse_off", "megabytes", "simulated_duration", "is_reference"]
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


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_report_with_too_few_seeds_says_so_once_per_table_not_per_cell(tmp_path, seeds):
    run = write_run(tmp_path / "run", *demo_tables(seeds=seeds, rounds=2))
    page = build_report([run], tmp_path / "out").read_text()
    gains = re.search(r'<section id="gains">(.*?)</section>', page, re.S).group(1)
    assert gains.count("too few seeds for an interval (n &lt; 3)") == 1  # under the table, not in its 18 cells
    drift = re.search(r'<section id="drift">(.*?)</section>', page, re.S).group(1)  # fedsgd: the drift corrector here
    assert drift.count("too few seeds for an interval (n &lt; 3)") == 1  # under the drift table, once too
    assert page.count("too few seeds for an interval (n &lt; 3)") == 3  # and once in the findings
    assert "no interval" not in page and "95% interval</th>" not in page  # no column of blanks in the summary
    assert " to " not in re.search(r"<tbody>(.*?)</tbody>", gains, re.S).group(1)  # no interval in any cell


def test_report_with_three_seeds_shows_intervals_and_no_note(demo_report):
    page = demo_report.read_text()
    assert "too few seeds" not in page
    summary = re.search(r'<section id="summary">(.*?)</section>', page, re.S).group(1)
    assert "95% interval</th>" in summary
    assert re.search(r"<td>isolated</td>(.*?)</tr>", summary).group(1).count(" to ") == 0  # the baseline has none


def test_report_names_test_sets_and_the_selected_round_once(demo_report, tmp_path):
    page = demo_report.read_text()
    assert page.count("Every accuracy and gain is read at the selected round") == 1
    assert "the last round (results.select=last)" in page  # DEMO_CONFIG records no rule: older runs took the last
    assert "final accuracy" not in page.lower() and "after the last round" not in page
    assert "global test set (the union of every institution&#x27;s test split)" in page
    run = write_run(tmp_path / "run", *demo_tables(seeds=(0,), rounds=2),
                    config={**DEMO_CONFIG, "results": {"select": "best_val"}})
    assert "(results.select=best_val)" in build_report([run], tmp_path / "out").read_text()


def test_report_spells_every_name_one_way(demo_report):
    from analysis.page import GUIDE

    headings = [h for h, _, _ in GUIDE.values()]
    assert len(headings) == len(set(headings))  # one heading per column, one column per heading
    page = demo_report.read_text()
    for wrong in ("city hospital", "Test accuracy", "Mean institution accuracy", "Megabytes exchanged", "mb_per_member_round"):
        assert wrong not in page
    matrix = re.search(r'<section id="gains">.*?<thead>(.*?)</thead>', page, re.S).group(1)
    assert re.findall(r'<th class="num">([^<]+)</th>', matrix) == ["fedavg", "fedprox", "fedsgd", "pooled"]


def test_runs_table_says_what_is_known_without_status_json(tmp_path, small):
    # A compare: no status.json of its own, its runs keep theirs in runs/.
    compare = write_run(tmp_path / "compare", *small)
    for name, state in (("fedavg-s0", "complete"), ("isolated-s0", "complete")):
        (compare / "runs" / name).mkdir(parents=True)
        (compare / "runs" / name / "status.json").write_text(json.dumps({"state": state}))
    older = write_run(tmp_path / "older", *small)
    results = load_results([compare, older])
    states = dict(zip(results.runs["directory"], results.runs["state"]))
    assert states[str(compare.resolve())] == "compare of 2 runs: 2 complete (each run's status.json in runs/)"
    assert states[str(older.resolve())].startswith("no status.json; its tables are written, so it is read as complete")
    assert results.runs["included"].all() and results.runs["complete"].all()
    page = build_report([compare, older], tmp_path / "out").read_text()
    assert "complete (no status.json)" not in page and "compare of 2 runs" in page
    assert run_state(older) == NO_STATUS


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


def test_cli_contribution_needs_the_runs_config(small_run, capfd):
    # A hand-built results folder has no runnable config to re-run coalitions from: one line, exit 2, from the
    # simulation command analysis hands over to (python -m sim.contribution, its own process: capfd)
    assert main(["contribution", str(small_run)]) == 2
    err = capfd.readouterr().err
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
