"""``python -m sim.bench.identity``: do two versions of the code give the same numbers? (a restructuring's check)

``capture DIR`` runs every shipped experiment (each ``conf/experiment/*`` through ``sim.compare``) and single runs
covering every scheme and every wrapper, all in smoke size and in-process, writing each run's tables under DIR;
``compare A B`` says, table by table, whether two captures hold the same values (bit for bit; run ids, which hash
the config, and measured wall time are left aside). To check a change, capture on a checkout of the code before it
and on the code after it (``PYTHONPATH=OLD_CHECKOUT python sim/bench/identity.py capture A``), then compare:

    python -m sim.bench.identity capture /tmp/after && python -m sim.bench.identity compare /tmp/before /tmp/after

Uses only ``sim.cli.compose``, ``sim.compare.compare`` and ``sim.engine.run``, which every version has; the runs name
today's config keys (an older checkout refuses the ones it lacks, and the capture lists them as failed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

SMOKE = ["smoke=true", "engine.backend=inprocess"]
EXPERIMENTS = ["async", "cheaters", "digits_label_skew", "slow_hardware", "small_sites", "stragglers", "trust",
               "foundation_docstrings", "heterogeneous_models", "multimodal_views"]
SCHEMES = ["isolated", "pooled", "fedavg", "fedprox", "fedsgd", "fedavgm", "fedadam", "fedyogi", "scaffold", "qffl",
           "ditto", "fedper", "finetune", "reptile", "dp_fedavg", "fedasync", "fedbuff"]
TEN = ["scenario.num_institutions=10", "+experiment=cheaters"]


def runs() -> dict[str, list[str]]:
    """Name -> overrides of every single run the capture makes."""
    out = {f"scheme_{s}": [f"scheme={s}"] for s in SCHEMES}
    out["scheme_compute_share"] = ["+experiment=slow_hardware", "scheme=compute_share"]
    out["scheme_split_learning"] = ["+experiment=multimodal_views", "scheme=split_learning"]  # it needs views
    for rule in ["median", "trimmed_mean", "krum", "multi_krum", "norm_clip"]:
        extra = ["aggregator.krum_m=3"] if rule == "multi_krum" else []
        out[f"merge_{rule}"] = [*TEN, "scheme=fedavg", f"aggregator={rule}", *extra]
        out[f"prox_merge_{rule}"] = [*TEN, "scheme=fedprox", f"aggregator={rule}"]
    for s in ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "dp_fedavg", "compute_share"]:
        out[f"secagg_{s}"] = (["+experiment=slow_hardware"] if s == "compute_share" else []) + [f"scheme={s}",
                                                                                              "secagg=masked"]
    for s in ["fedavg", "fedprox", "scaffold", "fedadam", "dp_fedavg"]:
        for method in ["topk", "int8"]:
            out[f"{method}_{s}"] = [f"scheme={s}", f"compression={method}"]
    out["privacy_fedadam"] = ["scheme=fedadam", "privacy=client_dp"]
    out["privacy_secagg_fedprox"] = ["scheme=fedprox", "privacy=client_dp", "secagg=masked"]
    out["topk_noef_fedavg"] = ["scheme=fedavg", "compression=topk", "compression.error_feedback=false"]
    out["dp_target"] = ["scheme=dp_fedavg", "scheme.noise_multiplier=null", "scheme.target_epsilon=8",
                        "scheme.cohort_fraction=0.5"]
    out["dpsgd_fedavg"] = ["scheme=fedavg", "+scenario.institutions.0.dp_noise_multiplier=1.0",
                           "+scenario.institutions.0.dp_clip_norm=1.0"]
    out["cohort_half"] = ["scheme=fedavg", "scenario.num_institutions=20", "scheme.cohort_fraction=0.5"]
    out["stragglers_deadline"] = ["scheme=fedprox", "scenario.straggler_share=0.5", "scenario.slowdown=[2.0,10.0]",
                                  "engine.round_deadline_s=1.0"]
    out["faults"] = ["scheme=fedavg", "scenario.availability=0.7", "scenario.failure_rate=0.1"]
    out["ditto_cheaters"] = ["scheme=ditto", "+experiment=cheaters"]
    out["novec_fedprox"] = ["scheme=fedprox", "engine.vectorise=false"]
    out["logreg_fedprox"] = ["scheme=fedprox", "model=logreg", "scenario.num_institutions=30"]
    for s in ["feddf", "fedmd"]:  # distillation needs a public set; and institutions of two architectures
        out[f"scheme_{s}"] = [f"scheme={s}", "data.public={source: heldout, rows: 300}"]
        out[f"mixed_{s}"] = [f"scheme={s}", "scenario=mixed_models", "data=digits", "data.public={source: heldout, rows: 200}"]
    return out


def capture(out: Path) -> int:
    """Run every experiment and single run into ``out`` (skipping what is there already); the number that failed."""
    from sim.cli import compose
    from sim.compare import compare
    from sim.engine import run

    t0, failed = time.perf_counter(), []
    jobs = [(f"exp_{e}", "compare", [f"+experiment={e}", "seeds=1"]) for e in EXPERIMENTS]
    jobs = [("default", "compare", ["seeds=2"]), *jobs, *((k, "config", v) for k, v in runs().items())]
    for k, (name, kind, overrides) in enumerate(jobs, 1):
        where = out / name
        if (where / "metrics.parquet").exists():
            continue
        try:
            cfg = compose(kind, SMOKE + overrides)
            compare(cfg, SMOKE + overrides, where) if kind == "compare" else run(cfg, where)
            print(f"{k}/{len(jobs)} {name}  {time.perf_counter() - t0:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - a capture lists what failed and goes on
            failed.append(name)
            print(f"{k}/{len(jobs)} {name} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"captured {len(jobs) - len(failed)} of {len(jobs)} into {out}" + (f"; failed: {failed}" if failed else ""))
    return len(failed)


def compare_captures(a: Path, b: Path) -> int:
    """Print, per table, whether two captures hold the same values; the number of tables that differ or are missing."""
    import pandas as pd

    same = bad = 0
    for where in sorted(p for p in a.iterdir() if p.is_dir()):
        for table in ("metrics", "ledger", "institutions"):
            fa, fb = where / f"{table}.parquet", b / where.name / f"{table}.parquet"
            if not fa.exists():
                continue
            if not fb.exists():
                print(f"missing  {where.name}/{table}")
                bad += 1
                continue
            x, y = (pd.read_parquet(f).drop(columns=["run_id", "compute_seconds"], errors="ignore") for f in (fa, fb))
            try:
                pd.testing.assert_frame_equal(x, y, check_exact=True)
                same += 1
            except AssertionError as e:
                bad += 1
                print(f"differ   {where.name}/{table}: {' '.join(str(e).split())[:300]}")
    print(f"{same} tables identical, {bad} differ or are missing")
    return bad


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    p = argparse.ArgumentParser(prog="python -m sim.bench.identity", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("capture", help="run everything into DIR").add_argument("dir", type=Path)
    c = sub.add_parser("compare", help="compare two captures")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "capture":
        return min(1, capture(args.dir))
    return min(1, compare_captures(args.a, args.b))


if __name__ == "__main__":
    sys.exit(main())
