"""Hand-built results tables for the analysis tests, written with the schema's own ``frame``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.core.results import frame, write_table

# name, discipline, share, label_skew, feature_skew, cpus (the default scenario in conf/scenario/default.yaml)
DEFAULT_INSTITUTIONS = [
    ("city_hospital", "medicine", 0.34, np.nan, 0.0, 0.5),
    ("rural_clinic", "medicine", 0.06, 0.3, 0.2, 0.1),
    ("particle_lab", "physics", 0.25, np.nan, 0.0, 0.25),
    ("astro_institute", "physics", 0.10, 0.5, 0.1, 0.1),
    ("central_bank", "finance", 0.20, np.nan, 0.0, 0.25),
    ("credit_union", "finance", 0.05, 0.3, 0.3, 0.1),
]


def write_run(path: Path, metrics: pd.DataFrame, ledger: pd.DataFrame, institutions: pd.DataFrame,
              config: dict | None = None, state: str | None = None) -> Path:
    """Write one run directory as the engine would: three parquet tables, config.yaml, optional status.json."""
    path.mkdir(parents=True, exist_ok=True)
    write_table(metrics, path / "metrics.parquet")
    write_table(ledger, path / "ledger.parquet")
    write_table(institutions, path / "institutions.parquet")
    (path / "config.yaml").write_text(yaml.safe_dump(config or {"seed": 0, "rounds": 1}))
    if state is not None:
        (path / "status.json").write_text(json.dumps({"state": state}))
    return path


def small_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Two institutions (A in discipline x, B in y), isolated and fedavg, seeds 0 and 1, rounds 0 and 1.

    Final accuracies:      isolated A 0.60/0.70, B 0.80/0.80;  fedavg A 0.70/0.75, B 0.78/0.76, global 0.74/0.76.
    So gains (points):     A +10/+5 (mean 7.5), B -2/-4 (mean -3).
    Ledger, fedavg runs:   each institution sends 1e6 and receives 2e6 bytes: 6 MB per run; isolated sends nothing.
    Round 0 rows carry other values on purpose: only the final round may count.
    """
    final = {
        ("isolated", 0): {"A": 0.60, "B": 0.80}, ("isolated", 1): {"A": 0.70, "B": 0.80},
        ("fedavg", 0): {"A": 0.70, "B": 0.78, "global": 0.74}, ("fedavg", 1): {"A": 0.75, "B": 0.76, "global": 0.76},
    }
    discipline = {"A": "x", "B": "y", "global": "global"}
    metrics, ledger, institutions = [], [], []
    for (scheme, seed), acc in final.items():
        run = {"run_id": f"{scheme}-{seed}", "scheme": scheme, "scenario": "s", "seed": seed}
        for who, value in acc.items():
            for rnd, v in ((0, 0.1), (1, value)):
                metrics.append({**run, "round": rnd, "institution": who, "discipline": discipline[who], "metric": "accuracy", "value": v})
                metrics.append({**run, "round": rnd, "institution": who, "discipline": discipline[who], "metric": "loss", "value": 1 - v})
        for who in ("A", "B"):
            up, down = (1_000_000, 2_000_000) if scheme == "fedavg" else (0, 0)
            ledger.append({**run, "round": 1, "institution": who, "participated": True, "bytes_up": up, "bytes_down": down,
                           "compute_seconds": 1.5, "simulated_seconds": 2.0 if who == "A" else 3.0, "samples": 100, "epsilon": np.nan})
            institutions.append({**run, "institution": who, "discipline": discipline[who], "share": 0.5, "train_samples": 100,
                                 "test_samples": 20, "label_skew": np.nan, "feature_skew": 0.0, "cpus": 1.0, "gpus": 0.0,
                                 "behaviour": "honest"})
    return frame("metrics", metrics), frame("ledger", ledger), frame("institutions", institutions)


def demo_tables(seeds=(0, 1, 2), schemes=("isolated", "fedavg", "fedprox", "fedsgd", "pooled"), rounds: int = 20,
                scenario: str = "default") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A plausible compare of the default scenario: curves that saturate, skewed institutions that may lose."""
    rng = np.random.default_rng(7)
    model_bytes = 250_000
    target = {"fedavg": 0.84, "fedprox": 0.845, "fedsgd": 0.78, "pooled": 0.87}
    metrics, ledger, institutions = [], [], []
    for scheme in schemes:
        for seed in seeds:
            run = {"run_id": f"{scenario}-{scheme}-{seed}", "scheme": scheme, "scenario": scenario, "seed": seed}
            finals = {}
            for name, disc, share, skew, shift, cpus in DEFAULT_INSTITUTIONS:
                alone = 0.58 + 0.5 * np.sqrt(share)
                penalty = 0.0 if np.isnan(skew) else 0.2 * (0.6 - skew) + 0.3 * shift
                finals[name] = (alone if scheme == "isolated" else target[scheme] - penalty) + rng.normal(0, 0.008)
                institutions.append({**run, "institution": name, "discipline": disc, "share": share,
                                     "train_samples": int(share * 20000), "test_samples": int(share * 4000),
                                     "label_skew": skew, "feature_skew": shift, "cpus": cpus, "gpus": 0.0, "behaviour": "honest"})
            if scheme != "isolated":
                finals["global"] = float(np.average(list(finals.values()), weights=[i[2] for i in DEFAULT_INSTITUTIONS])) + 0.01
            for name, final in finals.items():
                disc = "global" if name == "global" else next(i[1] for i in DEFAULT_INSTITUTIONS if i[0] == name)
                for rnd in range(rounds + 1):
                    acc = 0.1 + (final - 0.1) * (1 - np.exp(-rnd / 4)) + (rng.normal(0, 0.004) if rnd else 0)
                    for metric, value in (("accuracy", acc), ("loss", -np.log(max(acc, 1e-3))), ("train_loss", -np.log(max(acc, 1e-3)) * 0.9)):
                        metrics.append({**run, "round": rnd, "institution": name, "discipline": disc, "metric": metric, "value": value})
            for rnd in range(1, rounds + 1):
                for name, disc, share, skew, shift, cpus in DEFAULT_INSTITUTIONS:
                    up = down = {"isolated": 0, "pooled": 0}.get(scheme, model_bytes)
                    if scheme == "pooled" and rnd == 1:
                        up = int(share * 20000 * 60 * 4)  # the raw shard crosses once
                    compute = share * 12 / cpus * (0.2 if scheme == "fedsgd" else 1) * rng.uniform(0.9, 1.1)
                    ledger.append({**run, "round": rnd, "institution": name, "participated": True, "bytes_up": up,
                                   "bytes_down": down, "compute_seconds": compute,
                                   "simulated_seconds": compute + (up + down) / 12.5e6, "samples": int(share * 20000),
                                   "epsilon": np.nan})
    return frame("metrics", metrics), frame("ledger", ledger), frame("institutions", institutions)


DEMO_CONFIG = {"seed": 0, "rounds": 20, "scenario": {"name": "default"}, "model": {"name": "mlp"},
               "data": {"name": "synthetic"}}


@pytest.fixture
def small():
    """The small hand-built tables (metrics, ledger, institutions)."""
    return small_tables()


@pytest.fixture
def small_run(tmp_path, small):
    """The small tables written as one run directory."""
    return write_run(tmp_path / "small", *small)
