"""``python -m sim``: one simulation. A thin Hydra wrapper around :func:`sim.engine.run`."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sim.checkpoint import resume_overrides
from sim.cli import fail, guard
from sim.config import load_spec
from sim.rundir import check_argv
from sim.types import ConfigError, RunFailed


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the configured simulation into Hydra's output directory."""
    from sim.engine import Diverged, run

    out = cfg.get("resume") or HydraConfig.get().runtime.output_dir
    try:
        run(cfg, out)
    except ConfigError as e:
        fail(str(e))
    except RunFailed as e:  # the run directory says failed; its last checkpoint is kept
        if isinstance(e, Diverged):  # NaN metrics: resuming would diverge again, the message says what to change
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"error: {e}; continue with: python -m sim resume={out}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"results: {out}")


if __name__ == "__main__":
    guard("config", sys.argv[1:], load_spec)
    try:
        check_argv(sys.argv[1:])  # a used hydra.run.dir is refused before Hydra writes its .hydra/ into it
        sys.argv += resume_overrides(sys.argv[1:])  # resume=DIR: Hydra writes into DIR, not a new folder
    except ConfigError as e:
        fail(str(e))
    main()
