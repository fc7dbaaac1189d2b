"""``python -m sim.bench``: the flags, the order of the sections, the printed table and the JSON file."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from functools import partial
from typing import Any, Callable

from sim.bench import pooled
from sim.bench import workloads as w

SECTIONS = ("P", "S", "scale", "cluster", "foundation", "compare", "sweep", "pooled")  # --only names; sweep also with --sweep
DEFAULT = ("P", "S", "scale", "cluster", "foundation", "compare")  # the sweep is optional: it is a packing check, not a speed one


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__)
    ap.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)} (default: all but sweep)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark, not a measurement")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved plain/collabsim pairs per workload; medians reported "
                    "(the pooled section: seeds per variant)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the scale runs (default 5; 3 with --quick)")
    ap.add_argument("--sweep", action="store_true", help="also run the sweep-packing section")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override for every collabsim run and its plain twin (repeatable), "
                         "e.g. --set engine.backend=inprocess --set engine.eval_scope=cohort")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    picked = [s.strip() for s in args.only.split(",") if s.strip()] or [*DEFAULT, *(["sweep"] if args.sweep else [])]
    unknown = [s for s in picked if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1:
        ap.error("--repeats: must be >= 1")
    args.sections = picked
    return args


def run_sections(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected section, in the order of SECTIONS, as name -> result."""
    jobs: dict[str, Callable[[], dict[str, Any]]] = {}
    for name, overrides in w.fedavg_workloads(args.quick, args.rounds).items():
        if name.split("-")[0] in args.sections:
            jobs[name] = partial(w.fedavg_pair, name, [*overrides, *args.extra], args.repeats)
    if "cluster" in args.sections:  # P again, each command joining a local cluster that is already up (python -m sim.cluster)
        jobs["P-cluster"] = partial(w.with_cluster, "P-cluster", [*w.fedavg_workloads(args.quick, args.rounds)["P"],
                                                                  *args.extra], args.repeats)
    if "foundation" in args.sections:
        jobs["foundation"] = partial(w.foundation, args.repeats, args.quick)
    if "compare" in args.sections:
        jobs["compare"] = partial(w.command, "compare", "sim.compare",  # the target: 4 schemes, 1 seed
                                  ["seeds=1", *(["smoke=true"] if args.quick else []), *args.extra], args.repeats)
    if "pooled" in args.sections:  # central trainer vs Ray Train on 1 and 2 CPU workers (sim/bench/pooled.py)
        jobs["pooled"] = partial(pooled.pooled, args.quick, args.repeats, args.extra)
    if "sweep" in args.sections:
        overrides = ["sweep=compare_schemes", *(["smoke=true"] if args.quick else []), *args.extra]
        jobs["sweep"] = partial(w.command, "sweep", "sim.sweep", overrides, args.repeats, w.packing(overrides))
    results: dict[str, Any] = {}
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception as e:  # noqa: BLE001 - one failed workload must not cost the numbers of the others
            results[name] = {"kind": "failed", "error": f"{type(e).__name__}: {e}".strip()}
        if "skipped" in results[name] or "error" in results[name]:
            w.say(f"{name}: {results[name].get('skipped') or results[name]['error']}")
    return results


def _f(x: Any, width: int = 8, digits: int = 1) -> str:
    """A number right-aligned, '-' when missing."""
    if not isinstance(x, (int, float)) or math.isnan(x):
        return "-".rjust(width)
    return f"{x:{width}.{digits}f}"


def table(results: dict[str, Any]) -> str:
    """The compact text table: seconds, MiB, ratios (collabsim / plain), accuracies."""
    width = max([11, *(len(n) for n, r in results.items() if r["kind"] == "fedavg")])
    head = (f"{'workload':<{width}}|{'plain: total':>13}{'loop':>8}{'s/round':>9}{'RSS MiB':>9} |"
            f"{'collabsim: total':>17}{'start-up':>9}{'loop':>8}{'s/round':>9}{'RSS MiB':>9} |"
            f"{'x total':>8}{'x loop':>8} |{'acc plain':>10}{'collab':>7}")
    lines = [head, "-" * len(head)] if any(r["kind"] == "fedavg" for r in results.values()) else []
    for name, r in results.items():
        if r["kind"] != "fedavg":
            continue
        p, c, x = r["plain"], r["collabsim"], r["ratios"]
        lines.append(f"{name:<{width}}|{_f(p['total_s'], 13)}{_f(p['loop_s'])}{_f(p['round_s'], 9, 3)}"
                     f"{_f(p['peak_rss_mib'], 9, 0)} |{_f(c['total_s'], 17)}{_f(c['startup_s'], 9)}{_f(c['loop_s'])}"
                     f"{_f(c['round_s'], 9, 3)}{_f(c['peak_rss_mib'], 9, 0)} |{_f(x['total'], 8, 2)}"
                     f"{_f(x['loop'], 8, 2)} |{_f(p['accuracy'], 10, 3)}{_f(c['accuracy'], 7, 3)}")
    if results.get("foundation", {}).get("kind") == "foundation":
        r = results["foundation"]
        if "skipped" in r:
            lines.append(f"foundation: skipped - {r['skipped']}")
        else:
            p, c, x = r["plain"], r["collabsim"], r["ratios"]
            lines.append(f"foundation (MiniLM, LoRA in the top {r['layers']} of 6 layers, {r['steps']} steps of 32x32 "
                         f"tokens, 1 thread): training plain {p['samples_per_s']:.1f} samples/s, collabsim "
                         f"{c['samples_per_s']:.1f} reusing stored layers ({x['samples_per_s']:.2f}x; first epoch, "
                         f"storing them: {c['first_samples_per_s']:.1f}, {x['first_epoch']:.2f}x); scoring plain "
                         f"{p['score_samples_per_s']:.1f}, collabsim {c['score_samples_per_s']:.1f} "
                         f"({x['scoring']:.2f}x); max |logit difference| against every layer run {c['max_logit_diff']:.1e}")
    if results.get("pooled", {}).get("kind") == "pooled":
        lines += pooled.lines(results["pooled"])
    for name, r in results.items():
        if r["kind"] == "failed":
            lines.append(f"{name}: failed - {(r['error'].splitlines() or [''])[0]}")
    for name in ("compare", "sweep"):
        if name in results and results[name]["kind"] == "command":
            c = results[name]["collabsim"]
            extra = (f", {c['trials']:.0f} trials, packing {c['packing']:.2f} of {c['cpus']:.0f} CPUs over the command's"
                     f" wall ({c['packing_in_trial_span']:.2f} over the trials' span)" if name == "sweep" else "")
            lines.append(f"{name}: `{results[name]['command']}` {c['total_s']:.1f}s wall, peak RSS "
                         f"{c['peak_rss_mib']:.0f} MiB{extra}")
    return "\n".join(lines)


def _get(results: dict[str, Any], name: str, *path: str) -> float:
    """results[name][path...], NaN when that workload did not run (or failed)."""
    node: Any = results.get(name, {})
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return float(node) if isinstance(node, (int, float)) else math.nan


TARGETS: list[tuple[str, Callable[[dict[str, Any]], float], float, str]] = [
    # (what, its value from the results, the most it may be, unit)
    ("S (unequal shards) round loop on Ray / plain", lambda r: _get(r, "S", "ratios", "loop"), 0.35, "x"),
    ("S round loop in-process / plain", lambda r: _get(r, "S-inprocess", "ratios", "loop"), 0.25, "x"),
    ("s/round at 10,000 / at 1,000 (default settings: everybody scored)",
     lambda r: _get(r, "scale-10000-all", "collabsim", "round_s") / _get(r, "scale-1000-all", "collabsim", "round_s"),
     1.2, "x"),
    ("10,000 (default settings): peak RSS of the process tree",
     lambda r: _get(r, "scale-10000-all", "collabsim", "peak_rss_mib") / 1024, 4.0, "GiB"),
    ("10,000 (default settings): driver RSS growth per 10 rounds",
     lambda r: _get(r, "scale-10000-all", "collabsim", "driver_growth_mib_per_10_rounds"), 10.0, "MiB"),
    ("P with a local cluster already up: total / plain", lambda r: _get(r, "P-cluster", "ratios", "total"), 1.5, "x"),
]
"""The performance issues' targets the benchmark checks (2 idle cores; ratios against the plain loop of the same run)."""


def targets(results: dict[str, Any]) -> str:
    """One line per target whose workloads ran: the measured value, the limit, and whether it is met."""
    lines = []
    for what, value, limit, unit in TARGETS:
        v = value(results)
        if not math.isnan(v):
            lines.append(f"target: {what}: {v:.2f} {unit} (at most {limit:g}) - {'met' if v <= limit else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (and write JSON); returns what the JSON holds."""
    args = parse(argv)
    import torch

    torch.set_num_threads(1)  # the plain loops run like one collabsim institution: one thread
    t0 = time.perf_counter()
    w.say(f"sections {','.join(args.sections)}{' (quick)' if args.quick else ''}, repeats {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = run_sections(args)
    report = {"meta": {"argv": sys.argv[1:] if argv is None else argv, "quick": args.quick, "repeats": args.repeats,
                       "extra_overrides": args.extra, "cpus": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__, "load_average_end": os.getloadavg()[0],
                       "bench_seconds": time.perf_counter() - t0},
              "results": results}
    print(table(results), flush=True)
    if goals := targets(results):
        print(goals, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
        w.say(f"JSON: {args.json}")
    return report
