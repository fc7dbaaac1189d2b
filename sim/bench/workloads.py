"""The benchmark's workloads (from the performance issue) and how each is run against its plain baseline.

collabsim is driven only through its public entry points: ``python -m sim``,
``python -m sim.compare`` and ``python -m sim.sweep`` as subprocesses, whose results
tables are read back; the plain baselines run in this process (``sim.bench.plain``).
Every pair is interleaved (plain, collabsim, plain, collabsim, ...) and reported as medians.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from sim.bench import plain
from sim.bench.measure import CommandRun, run_command
from sim.cli import compose

SYNTHETIC_11 = ["data=synthetic", "data.alpha=1", "data.beta=1", "model=logreg", "scheme=fedavg"]
SAMPLES_PER_INSTITUTION = 20  # synthetic pool size per institution: the smallest power-law share still gets >= 4 train, 2 test


def population(n: int, cohort: int, rounds: int, scope: str = "cohort") -> list[str]:
    """Overrides for a generated Synthetic(1,1) population of ``n`` with a cohort of ``cohort`` per round.

    Synthetic(1,1) shards follow a power law (a few institutions hold hundreds of rows, most a handful) and many
    small ones hold a single class, as real federated populations do. ``scope="cohort"`` scores the round's cohort
    each round and everybody in the last (closest to the plain loop, which scores the global model only);
    ``scope="all"`` is the default setting, everybody every round."""
    return [*SYNTHETIC_11, f"scenario.num_institutions={n}", f"data.num_samples={SAMPLES_PER_INSTITUTION * n}",
            f"scheme.cohort_fraction={cohort / n:g}", f"rounds={rounds}", f"engine.eval_scope={scope}"]


PLAIN_PROTOCOL = ["training.schedule=constant", "data.val_fraction=0", "results.select=last"]
"""What the plain loop does: a constant learning rate, no validation split, the last round reported."""


def fedavg_workloads(quick: bool, scale_rounds: int | None) -> dict[str, list[str]]:
    """Name -> run-config overrides of every workload that has a plain FedAvg twin (P, S, scale-N), protocol included."""
    named = _fedavg_workloads(quick, scale_rounds)
    return {name: [*overrides, *PLAIN_PROTOCOL] for name, overrides in named.items()}


def _fedavg_workloads(quick: bool, scale_rounds: int | None) -> dict[str, list[str]]:
    """The workloads' own overrides."""
    if quick:  # a smoke test of the benchmark itself: every path, tiny sizes
        one_epoch = ["training.local_epochs=1"]
        return {"P": ["data=digits", "model=mlp", "scheme=fedavg", "scenario.num_institutions=20", "rounds=3", *one_epoch],
                "S": [*population(50, 5, 3), *one_epoch],
                **{f"scale-{n}": [*population(n, 10, scale_rounds or 3), *one_epoch] for n in (100, 300)},
                **{f"scale-{n}-all": [*population(n, 10, 4, "all"), *one_epoch] for n in (100, 300)}}
    p = ["data=digits", "model=mlp", "scheme=fedavg", "scheme.cohort_fraction=1.0", "scenario.num_institutions=20",
         "rounds=30"]
    s = population(1000, 50, 50)
    return {"P": p, "P-inprocess": [*p, "engine.backend=inprocess"], "S": s, "S-inprocess": [*s, "engine.backend=inprocess"],
            **{f"scale-{n}": population(n, 100, scale_rounds or 5) for n in (1000, 10000)},
            # The default settings (everybody scored every round), 30 rounds: what a round costs as the population grows.
            **{f"scale-{n}-all": population(n, 100, 30, "all") for n in (1000, 10000)}}


def say(message: str) -> None:
    """A progress line on stderr (stdout carries the table)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise median of numeric results over repeats (NaNs ignored)."""
    keys = dict.fromkeys(k for r in runs for k, v in r.items() if isinstance(v, (int, float)))
    out = {}
    for k in keys:
        values = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
        out[k] = statistics.median(values) if values else math.nan
    return out


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is zero."""
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def _checked(run: CommandRun, what: str) -> CommandRun:
    """The run, or a RuntimeError carrying the command's last output lines."""
    if run.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {run.returncode}):\n" + "\n".join(run.tail))
    return run


def collab_fedavg(overrides: list[str], label: str) -> dict[str, float]:
    """``python -m sim`` on the workload: its timeline, peak RSS, final global accuracy and summed local compute."""
    with tempfile.TemporaryDirectory(prefix="collabsim-bench-") as tmp:
        run = _checked(run_command([sys.executable, "-m", "sim", *overrides, f"hydra.run.dir={tmp}"], label=label),
                       f"python -m sim {' '.join(overrides)}")
        metrics, ledger = pd.read_parquet(Path(tmp) / "metrics.parquet"), pd.read_parquet(Path(tmp) / "ledger.parquet")
    acc = metrics[(metrics["institution"] == "global") & (metrics["metric"] == "accuracy")]
    return {"total_s": run.total_s, **run.timeline(), "peak_rss_mib": run.peak_rss_mib, **run.driver_growth(),
            "accuracy": float(acc.loc[acc["round"].idxmax(), "value"]), "rounds": run.rounds,
            "local_compute_s": float(ledger["compute_seconds"].sum())}


def fedavg_pair(name: str, overrides: list[str], repeats: int, settle: Callable[[], Any] | None = None
                ) -> dict[str, Any]:
    """Plain loop and collabsim on one workload, interleaved ``repeats`` times; medians and ratios. ``settle`` is called
    before each plain loop (waiting for background work to end, so the baseline runs on an idle machine)."""
    cfg = compose("config", overrides)
    runs = []
    for k in range(repeats):
        if settle is not None:
            settle()
        say(f"{name}: plain loop ({k + 1}/{repeats})")
        p = plain.plain_fedavg(cfg)
        say(f"{name}: plain {p['total_s']:.1f}s; collabsim ({k + 1}/{repeats}): python -m sim {' '.join(overrides)}")
        c = collab_fedavg(overrides, name)
        say(f"{name}: collabsim {c['total_s']:.1f}s")
        runs.append({"plain": p, "collabsim": c})
    p, c = medians([r["plain"] for r in runs]), medians([r["collabsim"] for r in runs])
    ratios = {"total": ratio(c["total_s"], p["total_s"]), "loop": ratio(c["loop_s"], p["loop_s"]),
              "startup": ratio(c["startup_s"], p["startup_s"])}
    return {"kind": "fedavg", "overrides": overrides, "plain": p, "collabsim": c, "ratios": ratios, "runs": runs}


def with_cluster(name: str, overrides: list[str], repeats: int) -> dict[str, Any]:
    """:func:`fedavg_pair` with a warm local cluster up for the whole pair (``python -m sim.cluster up``, started here
    and stopped after unless one was up already): each collabsim command joins it instead of starting Ray and finds
    workers that already imported torch. Each plain loop waits until the workers a command's end asked for have
    loaded (:func:`agents.runtime.cluster.settle`), so their start-up is not charged to the baseline."""
    from agents.runtime.cluster import settle, warm

    say(f"{name}: starting a local cluster (python -m sim.cluster up)")
    with warm():
        return fedavg_pair(name, overrides, repeats, settle=settle)


def foundation(repeats: int, quick: bool) -> dict[str, Any]:
    """Samples/s of collabsim's MiniLM+LoRA (adapters in the top 2 of 6 layers) training and scoring against plain
    transformers+peft with the same adapters on the same batches (every layer run every step)."""
    import sim.core.models.foundation as fm
    from transformers import AutoConfig

    layers = 2
    model_cfg = {"_target_": "sim.core.models.foundation.minilm", "adapter": "lora", "lora": {"layers": layers}}
    vocab = AutoConfig.from_pretrained(str(fm.minilm_path()), local_files_only=True).vocab_size
    steps, labels, lr = (2 if quick else 20), 8, 0.05
    x = plain.token_batches(vocab, steps)
    y = (x[:, 0] % labels).astype("int64")
    runs = []
    for k in range(repeats):
        say(f"foundation: plain transformers+peft, {steps} steps of 32 and scoring ({k + 1}/{repeats})")
        p = plain.plain_lora(x, y, labels, lr, layers=layers)
        say(f"foundation: plain {p['samples_per_s']:.1f} samples/s; collabsim local_train ({k + 1}/{repeats})")
        c = plain.collab_lora(model_cfg, x, y, labels, lr)
        say(f"foundation: collabsim {c['first_samples_per_s']:.1f} samples/s storing, {c['samples_per_s']:.1f} reusing")
        runs.append({"plain": p, "collabsim": c})
    p, c = medians([r["plain"] for r in runs]), medians([r["collabsim"] for r in runs])
    return {"kind": "foundation", "steps": steps, "layers": layers, "plain": p, "collabsim": c, "runs": runs,
            "ratios": {"samples_per_s": ratio(c["samples_per_s"], p["samples_per_s"]),
                       "first_epoch": ratio(c["first_samples_per_s"], p["samples_per_s"]),
                       "scoring": ratio(c["score_samples_per_s"], p["score_samples_per_s"])}}


def command(name: str, module: str, overrides: list[str], repeats: int,
            read: Callable[[Path, CommandRun], dict[str, float]] | None = None) -> dict[str, Any]:
    """Wall time and peak RSS of ``python -m module overrides`` (plus what ``read`` takes from its directory)."""
    runs = []
    for k in range(repeats):
        say(f"{name}: python -m {module} {' '.join(overrides)} ({k + 1}/{repeats})")
        with tempfile.TemporaryDirectory(prefix="collabsim-bench-") as tmp:
            run = _checked(run_command([sys.executable, "-m", module, *overrides, f"hydra.run.dir={tmp}"]), module)
            row = {"total_s": run.total_s, "peak_rss_mib": run.peak_rss_mib, "round_lines": run.round_lines}
            runs.append(row | (read(Path(tmp), run) if read else {}))
        say(f"{name}: {run.total_s:.1f}s")
    return {"kind": "command", "command": " ".join(["python -m", module, *overrides]), "collabsim": medians(runs),
            "runs": runs}


def packing(overrides: list[str]) -> Callable[[Path, CommandRun], dict[str, float]]:
    """Reader of a sweep directory: sum(trial CPU reservation x trial run time) / (CPUs x wall)."""

    def read(sweep_dir: Path, run: CommandRun) -> dict[str, float]:
        trials = pd.read_parquet(sweep_dir / "trials.parquet")
        sweep = compose("sweep_main", overrides).sweep
        cpus = float(os.cpu_count() or 1)  # a local Ray cluster offers every core
        # What sim.sweep.trial_bundles reserves: one core at most in-process, else the trial's whole budget.
        if sweep.backend == "inprocess":
            reserved = min(1.0, sweep.trial_cpus or 1.0)
        else:
            reserved = float(sweep.trial_cpus) if sweep.trial_cpus is not None else cpus
        busy = (trials["finished"] - trials["started"]).clip(lower=0)
        span = float(trials["finished"].max() - trials["started"].min())
        used = float(reserved * busy.sum())
        return {"trials": len(trials), "trial_cpus": reserved, "cpus": cpus, "trial_seconds": float(busy.sum()),
                "packing": used / (cpus * run.total_s), "packing_in_trial_span": used / (cpus * span) if span else math.nan}

    return read
