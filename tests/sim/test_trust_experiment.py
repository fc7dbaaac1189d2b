"""The shipped trust experiment and privacy sweep compose, validate before anything starts, and run small."""

from __future__ import annotations

import pandas as pd
from omegaconf import OmegaConf

from sim.cli import compose
from sim.compare import scheme_configs
from sim.checks import load_spec
from sim.sweep.space import variant_label
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
    assert {specs[k].wrappers["aggregator"]["_target_"].rpartition(".")[2] for k in ("median", "trimmed_mean", "krum")} == {
        "Median", "TrimmedMean", "Krum"}
    assert configs["fedavg"].scenario.behaviours is not None and configs["fedavg_honest"].scenario.behaviours is None
    assert cfg.seeds == 3


def test_privacy_sweep_crosses_epsilon_with_schemes_and_merge_rules_and_a_dp_trial_runs(tmp_path):
    # Prepare: every variant of the full sweep composes and validates before anything starts
    spec = check(compose("sweep_main", ["sweep=privacy"]), ["sweep=privacy"])
    base = base_overrides(spec, ["smoke=true"])
    dp = "dp_fedavg[scheme.target_epsilon=1.0]"
    # Execute: one DP trial, small, in this process
    from sim.engine import run

    trial = trial_config(base, {"variant": dp, "seed": 0}, spec.variants)
    run(trial, tmp_path / "trial", backend="inprocess")
    # Assert: epsilon crossed with DP-FedAvg only, the no-guarantee and cheated references beside it, epsilon booked
    assert spec.keys == ("variant",) and len(spec.seeds) == 3 and spec.trial_count() == 27
    assert {variant_label(v) for v in spec.dimensions[0].values} == {
        "isolated", "fedavg", "dp_fedavg", "fedavg_cheated", "median", "trimmed_mean", "krum"}
    assert [v for v in spec.variants if v.startswith("dp_fedavg")] == [
        f"dp_fedavg[scheme.target_epsilon={e}]" for e in ("1.0", "4.0", "16.0")]
    assert OmegaConf.select(trial, "scheme._target_").endswith("DPFedAvg") and trial.scheme.target_epsilon == 1.0
    assert trial.scenario.behaviours is None
    cheated = trial_config(base, {"variant": "krum", "seed": 0}, spec.variants)
    assert cheated.aggregator.name == "krum" and dict(cheated.scenario.behaviours) == {"sign_flip": 0.2, "free_rider": 0.1}
    ledger = pd.read_parquet(tmp_path / "trial" / "ledger.parquet")
    assert ledger["epsilon"].max() > 0
