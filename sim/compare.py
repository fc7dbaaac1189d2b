"""``python -m sim.compare``: several schemes on one scenario and seed, and the table that compares them."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sim.cli import compose, fail, group_options, guard
from sim.config import load_spec
from sim.results import write_table, write_text
from sim.types import ConfigError

log = logging.getLogger("collabsim")
BASELINE = "isolated"


def scheme_configs(cfg: DictConfig, overrides: list[str]) -> dict[str, DictConfig]:
    """One composed run config per scheme in ``cfg.schemes`` (the baseline added if missing)."""
    names = list(cfg.schemes)
    unknown = [n for n in names if n not in group_options("scheme")]
    if unknown:
        raise ConfigError("schemes", f"unknown scheme {unknown[0]!r}; choose from {', '.join(group_options('scheme'))}")
    if BASELINE not in names:
        log.warning("adding the %s baseline: every gain is measured against it", BASELINE)
        names.insert(0, BASELINE)
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("schemes=", "report=", "scheme="))]
    return {n: compose("config", keep + [f"scheme={n}"]) for n in dict.fromkeys(names)}


def compare(cfg: DictConfig, overrides: list[str], out_dir: Path) -> pd.DataFrame:
    """Run every scheme, write the combined tables and summary.csv into ``out_dir``, return the summary."""
    from analysis.metrics import summary
    from sim.engine import run

    results = []
    for name, sub in scheme_configs(cfg, overrides).items():
        results.append(run(sub, out_dir / "runs" / name))
    metrics = pd.concat([r.metrics for r in results], ignore_index=True)
    ledger = pd.concat([r.ledger for r in results], ignore_index=True)
    institutions = pd.concat([r.institutions for r in results], ignore_index=True)
    write_text(OmegaConf.to_yaml(cfg, resolve=True), out_dir / "config.yaml")
    write_table(metrics, out_dir / "metrics.parquet")
    write_table(ledger, out_dir / "ledger.parquet")
    write_table(institutions, out_dir / "institutions.parquet")
    table = summary(metrics, ledger)
    table.to_csv(out_dir / "summary.csv", index=False)
    return table


@hydra.main(config_path="../conf", config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Compare the configured schemes and print the table."""
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        table = compare(cfg, list(HydraConfig.get().overrides.task), out)
    except ConfigError as e:
        fail(str(e))
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"summary: {out / 'summary.csv'}")
    if cfg.report:
        from analysis.report import build_report

        print(f"report: {build_report([out], out)}")


def _check(cfg: DictConfig) -> None:
    """Validate every scheme's run config before anything starts."""
    for sub in scheme_configs(cfg, [a for a in sys.argv[1:] if not a.startswith("-")]).values():
        load_spec(sub)


if __name__ == "__main__":
    guard("compare", sys.argv[1:], _check)
    main()
