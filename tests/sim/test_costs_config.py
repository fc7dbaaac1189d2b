"""The costs config group: checked before any actor, recorded in every run's config.yaml, never part of the run id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.costs import cost_tables
from analysis.runs import load_results
from sim.checks import load_spec
from sim.engine import run
from sim.core.types import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, key, says", [
    ("costs.gpu_hour=-1", "costs.gpu_hour", "must be >= 0"),
    ("costs.cpu_hour=nan", "costs.cpu_hour", "expected a number >= 0"),
    ("+costs.gpu_hr=1.0", "costs.gpu_hr", "unknown key; costs takes"),
    ("+costs.institutions.bank.gpu_hour=1.2", "costs.institutions.bank", "unknown institution 'bank'; the scenario has"),
    ("+costs.institutions.central_bank.gb=-0.5", "costs.institutions.central_bank.gb", "must be >= 0"),
    ("+costs.institutions.central_bank.gpuhour=1", "costs.institutions.central_bank.gpuhour", "unknown key"),
])
def test_bad_prices_are_refused_naming_the_key(small_cfg, override, key, says):
    with pytest.raises(ConfigError) as err:
        load_spec(small_cfg(override))
    assert err.value.key == key and says in str(err.value) and "\n" not in str(err.value)


def test_a_negative_price_exits_non_zero_with_one_line_before_any_actor():
    done = subprocess.run([sys.executable, "-m", "sim", "costs.gb=-1", "smoke=true", "engine.backend=inprocess"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert done.stderr.strip() == "error: costs.gb: must be >= 0, got -1"


def test_prices_are_not_part_of_the_run_id_and_every_config_carries_them(small_cfg):
    plain = load_spec(small_cfg())
    priced = load_spec(small_cfg("costs.gpu_hour=9.0", "+costs.institutions.central_bank.gpu_hour=1.2"))
    assert plain.run_id == priced.run_id  # prices change no number a run computes
    assert priced.config["costs"]["institutions"] == {"central_bank": {"gpu_hour": 1.2}}
    assert set(plain.config["costs"]) >= {"currency", "cpu_hour", "gpu_hour", "gb", "cpu_watts", "gpu_watts", "kwh"}


def test_a_real_run_is_priced_from_its_own_ledger_and_config(small_cfg, tmp_path):
    run(small_cfg("scheme=fedavg", "costs.cpu_hour=2.0", "costs.gb=3.0"), tmp_path / "r", backend="inprocess")
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["costs"]["cpu_hour"] == 2.0
    results = load_results([tmp_path / "r"])
    tables, notes = cost_tables(results.metrics, results.ledger, results.institutions, results.configs)
    lg, inst = results.ledger, results.institutions.set_index("institution")
    own = lg[lg["institution"] != "global"]
    cpus = own["institution"].map(inst["cpus"]).where(lambda c: c > 0, 0.1)
    expected = ((own["sim_compute_seconds"] * cpus / 3600 * 2.0).sum()
                + ((own["bytes_up"] + own["bytes_down"]) / 1e9 * 3.0).sum())
    assert notes == [] and expected > 0
    assert tables["money"]["money"].iloc[0] == pytest.approx(expected, rel=1e-12)  # same sums, another order
    again = run(small_cfg("scheme=fedavg", "costs.cpu_hour=2.0", "costs.gb=3.0"), tmp_path / "r2", backend="inprocess")
    pd.testing.assert_frame_equal(again.ledger.drop(columns="compute_seconds"),
                                  results.ledger.drop(columns="compute_seconds"), check_dtype=False)


def test_a_stopped_run_repriced_in_its_config_yaml_resumes_to_the_same_numbers(small_cfg, tmp_path):
    from sim.cli import compose
    from stopping import Stop, stop_after

    cfg = small_cfg("checkpoint_every=1")
    ref = run(cfg, tmp_path / "ref", backend="inprocess")
    with pytest.raises(Stop):
        run(cfg, tmp_path / "cut", backend="inprocess", on_round=stop_after(1))
    path = tmp_path / "cut" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    saved["costs"]["gpu_hour"] = 7.0  # repricing is not editing the run: the resume is accepted
    path.write_text(yaml.safe_dump(saved))
    resumed = run(compose("config", [f"resume={tmp_path / 'cut'}"]), backend="inprocess")
    pd.testing.assert_frame_equal(resumed.metrics, ref.metrics)
    assert yaml.safe_load(path.read_text())["costs"]["gpu_hour"] == 7.0
