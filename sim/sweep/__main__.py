"""``python -m sim.sweep sweep=<name>``: the command (see :mod:`sim.sweep`)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sim.cli import fail, launch
from sim.sweep import check, sweep
from sim.sweep.results import render
from sim.sweep.space import load_sweep
from sim.core.types import ConfigError


@hydra.main(config_path="../../conf", config_name="sweep_main", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the configured sweep and print its summary."""
    out = Path(HydraConfig.get().runtime.output_dir)
    command_line = list(HydraConfig.get().overrides.task)
    try:
        trials, summary = sweep(cfg, command_line, out)
    except ConfigError as e:
        fail(str(e))
    spec = load_sweep(OmegaConf.to_container(cfg.sweep, resolve=True), smoke=bool(cfg.smoke))
    print(render(spec, trials, summary, out.resolve()))
    failed = trials[trials["status"] == "error"]
    if len(failed):
        print(f"error: {len(failed)} trial(s) failed; first: {failed['error'].iloc[0]}", file=sys.stderr)
        raise SystemExit(1)
    unfinished = trials["status"].isin(["pending", "incomplete"]).sum()
    if unfinished:
        print(f"error: interrupted with {unfinished} trial(s) unfinished; continue with the same command and resume=true",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    launch(main, "sweep_main", check, with_overrides=True)  # check(cfg, command line without hydra.* keys)
