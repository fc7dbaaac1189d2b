"""The compute-balance tables (analysis/compute.py) and their section in the report, from hand-made ledgers.

A compute_share run (seed 0) beside small_tables' isolated and fedavg runs; A lends B compute:
    round 1: A simulated 2.5 (solo 2.0), gives 0.4 s;  B simulated 2.6 (solo 3.0), takes 0.4 s, sends 500 kB of data
    round 2: A simulated 2.4 (solo 2.0), gives 0.4 s;  B simulated 2.5 (solo 3.0), takes 0.4 s, sends nothing
So A gives 0.8 s, B takes 0.8 s and moves 0.5 MB; the run lasts 2.6 + 2.5 = 5.1 s against 3 + 3 = 6 s unshared.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.compute import balance_table, saved_table
from analysis.report import build_report
from conftest import small_tables, write_run
from sim.core.results import frame

RUN = {"run_id": "compute_share-0", "scheme": "compute_share", "scenario": "s", "seed": 0}


def shared_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """small_tables plus the compute_share run of the module docstring (its metrics: fedavg seed 0's)."""
    mt, lg, inst = small_tables()
    rows = []
    for rnd, a, b, nbytes in ((1, 2.5, 2.6, 500_000), (2, 2.4, 2.5, 0)):
        common = RUN | {"round": rnd, "participated": True, "bytes_up": 1_000, "bytes_down": 1_000, "samples": 100,
                        "compute_seconds": 1.0, "epsilon": np.nan, "status": "ok"}
        rows.append(common | {"institution": "A", "simulated_seconds": a, "solo_seconds": 2.0, "trained_by": "A",
                              "compute_given_seconds": 0.4, "compute_taken_seconds": 0.0, "data_bytes": 0})
        rows.append(common | {"institution": "B", "simulated_seconds": b, "solo_seconds": 3.0, "trained_by": "A",
                              "compute_given_seconds": 0.0, "compute_taken_seconds": 0.4, "data_bytes": nbytes})
    shared_mt = mt[mt["run_id"] == "fedavg-0"].assign(run_id=RUN["run_id"], scheme="compute_share")
    shared_inst = inst[inst["run_id"] == "fedavg-0"].assign(run_id=RUN["run_id"], scheme="compute_share")
    return (pd.concat([mt, shared_mt], ignore_index=True), pd.concat([lg, frame("ledger", rows)], ignore_index=True),
            pd.concat([inst, shared_inst], ignore_index=True))


def test_balance_table_books_giver_and_taker() -> None:
    # Execute
    table = balance_table(shared_tables()[1]).set_index("institution")
    # Assert: only the sharing run's two institutions; fedavg and isolated lent nothing
    assert list(table.index) == ["A", "B"] and set(table["scheme"]) == {"compute_share"}
    assert table.loc["A", "role"] == "giver" and table.loc["A", "partners"] == "B"
    assert table.loc["B", "role"] == "taker" and table.loc["B", "partners"] == "A"
    assert table.loc["A", "compute_given_seconds"] == pytest.approx(0.8)
    assert table.loc["A", "net_compute_seconds"] == pytest.approx(0.8)
    assert table.loc["B", "compute_taken_seconds"] == pytest.approx(0.8)
    assert table.loc["B", "net_compute_seconds"] == pytest.approx(-0.8)
    assert table.loc["B", "data_mb"] == pytest.approx(0.5) and table.loc["A", "data_mb"] == 0


def test_time_saved_compares_the_makespans_with_and_without_sharing() -> None:
    # Execute
    saved = saved_table(shared_tables()[1]).set_index("scheme")
    # Assert: 6.0 - 5.1 = 0.9 s saved (15%); runs written without solo_seconds (fedavg here) save nothing
    assert saved.loc["compute_share", "duration_unshared"] == pytest.approx(6.0)
    assert saved.loc["compute_share", "simulated_duration"] == pytest.approx(5.1)
    assert saved.loc["compute_share", "time_saved"] == pytest.approx(0.9)
    assert saved.loc["compute_share", "time_saved_share"] == pytest.approx(0.15)
    assert saved.loc["fedavg", "time_saved"] == 0 and saved.loc["fedavg", "runs"] == 2


def test_report_shows_the_balance_only_when_compute_was_shared(tmp_path) -> None:
    # Prepare
    shared = write_run(tmp_path / "shared", *shared_tables(), state="complete")
    plain = write_run(tmp_path / "plain", *small_tables(), state="complete")
    # Execute
    page = build_report([shared], tmp_path / "out").read_text()
    without = build_report([plain], tmp_path / "out2").read_text()
    # Assert
    assert 'id="compute"' in page and "Who lent compute to whom" in page and 'href="#compute"' in page
    assert 'id="compute"' not in without and 'href="#compute"' not in without
    exported = pd.read_csv(tmp_path / "out" / "tables" / "compute_balance.csv")
    assert set(exported["role"]) == {"giver", "taker"}
    assert (tmp_path / "out" / "tables" / "time_saved.csv").is_file()
