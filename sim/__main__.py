"""``python -m sim``: one simulation. A thin Hydra wrapper around :func:`sim.engine.run`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sim.core.checkpoint import resume_overrides
from sim.cli import fail, launch
from sim.checks import load_spec
from sim.core.config import RunSpec
from sim.core.types import ConfigError, RunFailed


EARLY: list = []
"""The run's data and actors, made while Hydra composes the config (:func:`start`), until the run takes them."""


def start(spec: RunSpec) -> None:
    """Right after the guard: build the run's data and ask the warm local cluster for its actors
    (:func:`sim.engine.start_early`; nothing where none is up)."""
    from sim.engine import start_early

    EARLY[:] = [start_early(spec)]


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the configured simulation into Hydra's output directory."""
    from sim.engine import Diverged, run

    out = cfg.get("resume") or HydraConfig.get().runtime.output_dir
    early = EARLY.pop() if EARLY else None
    try:
        result = run(cfg, out, early=early)
    except ConfigError as e:
        fail(str(e))
    except RunFailed as e:  # the run directory says failed; its last checkpoint is kept
        if isinstance(e, Diverged):  # NaN metrics: resuming would diverge again, the message says what to change
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"error: {e}; continue with: python -m sim resume={out}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if early is not None:
            early.close()
    text = run_summary(result.metrics, result.ledger)
    print(text)
    for caveat in result.caveats():  # the warnings that change what the numbers mean, where the reader looks
        print(f"note: {caveat}")
    print(f"results: {out}")
    track(cfg, out, text)


def track(cfg: DictConfig, out: str, text: str) -> None:
    """Log the finished run to the tracking backend (``tracking=``), read back from its run directory."""
    from sim.tracking import parse, track_run

    tracking = parse(cfg.get("tracking"))
    try:
        folder = track_run(tracking, Path(out), text)
    except ConfigError as e:
        fail(str(e))
    if folder is not None:
        print(f"tracking: {tracking.backend} in {folder}; open with: {tracking.opening(folder)}")


def run_summary(metrics: pd.DataFrame, ledger: pd.DataFrame) -> str:
    """What a run prints at its end: each institution's final (selected) accuracy, the global model's, megabytes."""
    from analysis.metrics import BASELINE, institution_finals, run_accuracy, run_costs

    finals = institution_finals(metrics)
    run = run_accuracy(metrics).iloc[0]
    costs = run_costs(ledger)
    # Under isolated nothing is merged: the engine's global row is the mean of the institutions' own models.
    model = "(mean of own models)" if run["scheme"] == BASELINE else "(global model)"
    rows = [(str(r.institution), str(r.discipline), "own test split", r.accuracy) for r in finals.itertuples()]
    rows.append(("global", model, "global test set", run["global_accuracy"]))
    head = ("institution", "discipline", "tested on", "accuracy")
    w = [max(len(x[i]) for x in [head, *rows]) for i in range(3)]
    line = "  {:<%d}  {:<%d}  {:<%d}  {:>8}" % tuple(w)
    mb = float(costs["megabytes"].iloc[0]) if len(costs) else 0.0
    up, down = (float(costs[c].iloc[0]) / 1e6 if len(costs) else 0.0 for c in ("bytes_up", "bytes_down"))
    return "\n".join([f"{run['scheme']} on {run['scenario']}, seed {run['seed']}: final (selected) accuracy",
                      line.format(*head), *(line.format(*r[:3], f"{r[3]:.3f}") for r in rows),
                      f"exchanged: {mb:.2f} MB ({up:.2f} up, {down:.2f} down)"])

if __name__ == "__main__":
    # resume=DIR: Hydra writes into DIR itself; a warm cluster starts the run's actors while Hydra composes
    launch(main, "config", load_spec, more_argv=resume_overrides, early=start)
