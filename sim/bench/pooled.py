"""The ``pooled`` section: the central trainer against Ray Train with one and with two CPU workers.

Each variant is ``python -m sim scheme=pooled`` on the digits data (iid, equal shares):
``-1`` variants have one institution holding it all, ``-2`` variants two halves (the
split into train, validation and test rows differs, so compare within a pair).
``central-N`` trains in the coordinator, ``ray_train-1`` on one Ray Train worker,
``ray_train-2`` on two (one per institution, DDP over gloo). Every
variant runs for the same seeds; the table gives the mean and spread of the final global
accuracy and the median wall times (start-up includes Ray Train's: its job starts in
round 1).
"""

from __future__ import annotations

import statistics
from typing import Any

from sim.bench.workloads import collab_fedavg, medians, say

VARIANTS = {  # name -> (institutions, trainer)
    "central-1": (1, "central"),
    "ray_train-1": (1, "ray_train"),
    "central-2": (2, "central"),
    "ray_train-2": (2, "ray_train"),
}


def overrides(institutions: int, trainer: str, seed: int, quick: bool) -> list[str]:
    """One variant's run: the digits pool over ``institutions`` equal iid shards, 0.75 CPU each, on a 2-CPU cluster."""
    return ["scheme=pooled", f"scheme.trainer={trainer}", "data=digits", "data.partition=iid", "model=mlp",
            f"model.hidden={[64] if quick else [512, 512]}".replace(" ", ""), f"rounds={2 if quick else 5}",
            f"scenario.num_institutions={institutions}", "scenario.quantity_skew=0", "scenario.label_skew=null",
            "scenario.cpus=0.75", "cluster.num_cpus=2", "placement=pooled", f"seed={seed}", "checkpoint_every=0"]


def pooled(quick: bool, seeds: int, extra: list[str]) -> dict[str, Any]:
    """Every variant for ``seeds`` seeds (interleaved by seed): accuracy mean/spread, median wall times."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for seed in range(seeds):
        for name, (n, trainer) in VARIANTS.items():
            args = [*overrides(n, trainer, seed, quick), *extra]
            say(f"pooled: {name}, seed {seed}: python -m sim {' '.join(args)}")
            runs[name].append(collab_fedavg(args, f"pooled {name}"))
            say(f"pooled: {name} {runs[name][-1]['total_s']:.1f}s, accuracy {runs[name][-1]['accuracy']:.3f}")
    out = {}
    for name, rs in runs.items():
        acc = [r["accuracy"] for r in rs]
        out[name] = medians(rs) | {"accuracy_mean": statistics.fmean(acc),
                                   "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else float("nan")}
    return {"kind": "pooled", "seeds": seeds, "variants": out, "runs": runs,
            "overrides": {name: overrides(n, t, 0, quick) for name, (n, t) in VARIANTS.items()}}


def lines(r: dict[str, Any]) -> list[str]:
    """The section's rows of the printed table."""
    head = f"{'pooled':<12}|{'accuracy':>9}{'± sd':>7} |{'total s':>8}{'start-up':>9}{'loop':>7}{'s/round':>8}{'RSS MiB':>8}"
    rows = [head, "-" * len(head)]
    for name, v in r["variants"].items():
        rows.append(f"{name:<12}|{v['accuracy_mean']:9.3f}{v['accuracy_sd']:7.3f} |{v['total_s']:8.1f}"
                    f"{v['startup_s']:9.1f}{v['loop_s']:7.1f}{v['round_s']:8.2f}{v['peak_rss_mib']:8.0f}")
    rows.append(f"(seeds 0..{r['seeds'] - 1}; wall times are medians over them)")
    return rows
