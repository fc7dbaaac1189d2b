"""Time to a target accuracy on the simulated clock: what asynchronous schemes are for.

Rounds mean different things to a synchronous scheme (everybody trains, the slowest sets the
pace) and an asynchronous one (one arrival at the server), so schemes are compared on the
ledger's ``sim_time``: for each scheme and seed, the global model's final accuracy, the simulated
time the run ended, and the first simulated time its global accuracy reached the reference
scheme's final accuracy on the same seed (NaN: never). Reads results tables only.

``python -m analysis.asynchrony RUN_DIR [--reference fedavg] [--fraction 1.0]`` prints the table of a compare run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.metrics import GLOBAL


def time_to_accuracy(metrics: pd.DataFrame, ledger: pd.DataFrame, reference: str = "fedavg",
                     fraction: float = 1.0) -> pd.DataFrame:
    """One row per scheme x seed: final_accuracy, end_time, target (``fraction`` of the reference's final accuracy on
    that seed) and time_to_target (first simulated time the global accuracy was at least the target; NaN if never)."""
    acc = metrics[(metrics.institution == GLOBAL) & (metrics.metric == "accuracy")]
    clock = ledger.groupby(["scheme", "seed", "round"]).sim_time.first()
    if reference not in set(acc.scheme):
        raise ValueError(f"no runs of the reference scheme {reference!r}; schemes here: {sorted(set(acc.scheme))}")
    rows = []
    for (scheme, seed), runs in acc.sort_values("round").groupby(["scheme", "seed"], sort=True):
        ref = acc[(acc.scheme == reference) & (acc.seed == seed)].sort_values("round")
        target = fraction * float(ref.value.iloc[-1])
        times = [0.0 if r == 0 else float(clock[(scheme, seed, r)]) for r in runs["round"]]
        reached = [t for t, v in zip(times, runs.value) if v >= target]
        rows.append({"scheme": scheme, "seed": int(seed), "final_accuracy": float(runs.value.iloc[-1]),
                     "end_time": times[-1], "target": target,
                     "time_to_target": reached[0] if reached else np.nan})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    """Print the time-to-accuracy table of a run directory holding metrics.parquet and ledger.parquet."""
    parser = argparse.ArgumentParser(prog="python -m analysis.asynchrony", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--reference", default="fedavg", help="scheme whose final accuracy is the target")
    parser.add_argument("--fraction", type=float, default=1.0, help="target = this fraction of that accuracy")
    args = parser.parse_args(argv)
    missing = [f for f in ("metrics.parquet", "ledger.parquet") if not (args.run_dir / f).is_file()]
    if missing:
        print(f"run_dir: {args.run_dir} has no {missing[0]}; give a finished run or compare directory", file=sys.stderr)
        return 2
    table = time_to_accuracy(pd.read_parquet(args.run_dir / "metrics.parquet"),
                             pd.read_parquet(args.run_dir / "ledger.parquet"), args.reference, args.fraction)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    means = table.groupby("scheme")[["final_accuracy", "end_time", "time_to_target"]].agg(["mean", "std", "count"])
    print(means.to_string(float_format=lambda x: f"{x:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
