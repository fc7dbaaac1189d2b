"""``python -m sim``: one simulation. A thin Hydra wrapper around :func:`sim.engine.run`."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sim.cli import fail, guard
from sim.config import load_spec
from sim.types import ConfigError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the configured simulation into Hydra's output directory."""
    from sim.engine import run

    out = HydraConfig.get().runtime.output_dir
    try:
        run(cfg, out)
    except ConfigError as e:
        fail(str(e))
    print(f"results: {out}")


if __name__ == "__main__":
    guard("config", sys.argv[1:], load_spec)
    main()
