"""The shipped trust experiment and privacy sweep compose, validate before anything starts, and run small."""

from __future__ import annotations

import pandas as pd
from omegaconf import OmegaConf

from sim.cli import compose
from sim.compare import scheme_configs
from sim.config import load_spec
from sim.sweep import base_overrides, check, trial_config


def test_trust_compares_fedavg_robust_merges_dp_and_an_honest_reference():
    # Prepare
    overrides = ["+experiment=trust"]
    cfg = compose("compare", overrides)
    # Execute
    configs = scheme_configs(cfg, overrides)
    # Assert: every run validates, one spends a privacy budget, one has nobody cheating
    specs = {label: load_spec(c) for label, c in configs.items()}
    assert set(specs) == {"isolated", "fedavg", "dp_fedavg", "median", "trimmed_mean", "krum", "fedavg_honest"}
    assert {specs[k].scheme.get("merge") for k in ("median", "trimmed_mean", "krum")} == {"median", "trimmed_mean", "krum"}
    assert configs["fedavg"].scenario.behaviours is not None and configs["fedavg_honest"].scenario.behaviours is None
    assert cfg.seeds == 3


def test_privacy_sweep_checks_and_a_smoke_trial_runs_with_epsilon_in_its_ledger(tmp_path):
    # Prepare
    cfg = compose("sweep_main", ["sweep=privacy", "smoke=true"])
    spec = check(cfg, ["sweep=privacy", "smoke=true"])
    base = base_overrides(spec, ["smoke=true"])
    # Execute: the first trial, in this process
    from sim.engine import run

    trial = trial_config(base, {"scheme.target_epsilon": spec.dimensions[0].values[0], "seed": 0})
    run(trial, tmp_path / "trial", backend="inprocess")
    # Assert: epsilon is swept, seeds shrink under smoke, and the trial's ledger carries epsilon
    assert spec.keys == ("scheme.target_epsilon",) and len(spec.seeds) == 2
    assert OmegaConf.select(trial, "scheme._target_").endswith("DPFedAvg")
    ledger = pd.read_parquet(tmp_path / "trial" / "ledger.parquet")
    assert ledger["epsilon"].max() > 0
