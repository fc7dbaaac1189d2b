"""The identity check of a restructuring: two captures compare table by table, value for value."""

from __future__ import annotations

import pandas as pd

from sim.bench.identity import compare_captures, runs


def write(root, name: str, values: list[float], run_id: str = "a") -> None:
    """A capture folder ``name`` holding one metrics table."""
    (root / name).mkdir(parents=True)
    pd.DataFrame({"run_id": run_id, "value": values, "compute_seconds": [0.1] * len(values)}).to_parquet(
        root / name / "metrics.parquet")


def test_identical_values_pass_whatever_the_run_ids_and_wall_times(tmp_path, capsys) -> None:
    write(tmp_path / "a", "x", [0.5, 0.25])
    write(tmp_path / "b", "x", [0.5, 0.25], run_id="b")  # another config hash: not a number
    assert compare_captures(tmp_path / "a", tmp_path / "b") == 0
    assert "1 tables identical, 0 differ" in capsys.readouterr().out


def test_a_value_one_ulp_away_or_a_missing_table_fails(tmp_path, capsys) -> None:
    write(tmp_path / "a", "x", [0.5, 0.25])
    write(tmp_path / "a", "y", [1.0])
    write(tmp_path / "b", "x", [0.5, 0.25000000000000006])
    assert compare_captures(tmp_path / "a", tmp_path / "b") == 2
    out = capsys.readouterr().out
    assert "differ   x/metrics" in out and "missing  y/metrics" in out


def test_the_capture_covers_every_scheme_and_every_wrapper_option() -> None:
    from agents.schemes import SCHEMES
    from sim.cli import group_options

    asked = " ".join(o for overrides in runs().values() for o in overrides)
    assert all(f"scheme={s}" in asked for s in SCHEMES)
    for group in ("aggregator", "secagg", "privacy", "compression"):
        assert all(f"{group}={o}" in asked for o in group_options(group) if o not in ("mean", "none")), group
