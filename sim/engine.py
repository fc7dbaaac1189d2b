"""The round loop: one simulation from a config to tidy results.

``run(cfg)`` is a plain function; ``python -m sim`` is a thin Hydra wrapper around it.
Read it top to bottom: validate, build data, place actors, then each round select,
train, merge, score and book-keep.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.config import RunSpec, load_spec
from sim.data import build_federation
from sim.models import build_model, model_flops
from sim.results import frame, write_table, write_text
from sim.types import GLOBAL, Federation, InstitutionSpec

log = logging.getLogger("collabsim")


@dataclass
class RunResult:
    """The tidy tables of one run (see sim/results.py for the schema)."""

    run_id: str
    metrics: pd.DataFrame
    ledger: pd.DataFrame
    institutions: pd.DataFrame


def run(
    cfg: DictConfig | Mapping[str, Any] | RunSpec,
    out_dir: str | Path | None = None,
    *,
    backend: str = "ray",
    institutions: tuple[str, ...] | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Run one simulation; write its run directory if ``out_dir`` is given."""
    # 1. Validate everything before any actor starts.
    spec = cfg if isinstance(cfg, RunSpec) else load_spec(cfg)
    if institutions is not None:
        spec = spec.restrict(tuple(institutions))
    members = spec.only or spec.scenario.names
    specs = tuple(s for s in spec.scenario.institutions if s.name in set(members))

    # 2. Data: every institution's shard and the global test set (the same whatever the coalition).
    fed = build_federation(spec.data, spec.scenario, spec.seed, smoke=spec.smoke)
    flops = model_flops(build_model(spec.model, fed.input_shape, fed.num_classes, seed=spec.seed), fed.input_shape)

    # 3. Place hosts and coordinator.
    runner = _start_backend(backend, spec, specs, fed, flops)
    keys = {"run_id": spec.run_id, "scheme": spec.scheme_name, "scenario": spec.scenario.name, "seed": spec.seed}
    discipline = {s.name: s.discipline for s in specs} | {GLOBAL: GLOBAL}
    metric_rows: list[dict] = []
    ledger_rows: list[dict] = []
    sim_time, wall0 = 0.0, time.perf_counter()
    try:
        for r in range(1, spec.rounds + 1):
            # 4. The scheme picks the cohort and the local plan.
            ctx = runner.begin_round(r, sim_time)
            if r == 1:
                metric_rows += _scores(keys, 0, runner.evaluate(ctx.plan), discipline)
            # 5. Local steps fan out; the coordinator merges what arrived, in scenario order.
            rows = runner.train_and_merge(ctx)
            # 6. The round lasts as long as its slowest participant (synchronous rounds).
            round_seconds = max((row["simulated_seconds"] for row in rows), default=0.0)
            sim_time += round_seconds
            for row in rows:
                loss = row.pop("train_loss", math.nan)
                if row["participated"] and not math.isnan(loss):
                    metric_rows.append(keys | {"round": r, "institution": row["institution"],
                                               "discipline": discipline[row["institution"]],
                                               "metric": "train_loss", "value": loss})
                ledger_rows.append(keys | {"round": r, "epsilon": math.nan} | row)
            # 7. Score the models everybody ends the round with.
            scores = _scores(keys, r, runner.evaluate(ctx.plan), discipline)
            metric_rows += scores
            summary = _progress(scores)
            log.info("[%s] round %d/%d  global acc %.3f  mean institution acc %.3f  cohort %d  simulated %.1fs  wall %.1fs",
                     spec.scheme_name, r, spec.rounds, summary["global_accuracy"], summary["mean_accuracy"],
                     len(ctx.cohort), sim_time, time.perf_counter() - wall0)
            if on_round is not None:
                on_round(r, summary)
    finally:
        runner.close()

    # 8. Tidy tables out.
    result = RunResult(
        run_id=spec.run_id,
        metrics=frame("metrics", metric_rows),
        ledger=frame("ledger", ledger_rows),
        institutions=frame("institutions", [_institution_row(keys, s, fed) for s in specs]),
    )
    if out_dir is not None:
        write_run(Path(out_dir), result, cfg)
    return result


def write_run(out_dir: Path, result: RunResult, cfg: Any) -> None:
    """Write a run directory: resolved config and the three tables, each atomically."""
    if isinstance(cfg, DictConfig):
        write_text(OmegaConf.to_yaml(cfg, resolve=True), out_dir / "config.yaml")
    write_table(result.metrics, out_dir / "metrics.parquet")
    write_table(result.ledger, out_dir / "ledger.parquet")
    write_table(result.institutions, out_dir / "institutions.parquet")


def _start_backend(kind: str, spec: RunSpec, specs: tuple[InstitutionSpec, ...], fed: Federation, flops: int):
    """The in-process backend, or Ray actors placed per the layout."""
    from agents.backend import InProcessBackend, RayBackend, connect
    from agents.placement import plan_layout

    if kind == "inprocess":
        return InProcessBackend(spec, specs, fed, flops)
    cpus, gpus = connect(dict(spec.cluster))
    layout = plan_layout(spec, specs, cpus, gpus)
    for w in layout.warnings:
        log.warning(w)
    log.info("[%s] %d institutions on %d %s host actor(s) + coordinator", spec.scheme_name, len(specs),
             len(layout.hosts), layout.mode)
    return RayBackend(spec, specs, fed, flops, layout)


def _scores(keys: dict, r: int, evaluated, discipline: dict[str, str]) -> list[dict]:
    """Metric rows for one round's evaluation."""
    glob, per_institution = evaluated
    rows = []
    if any("global_accuracy" in m for _, m in per_institution):
        # No merged model (e.g. isolated): the global row averages the institutions' own models.
        glob = {"accuracy": float(np.mean([m["global_accuracy"] for _, m in per_institution])),
                "loss": float(np.mean([m["global_loss"] for _, m in per_institution]))}
    for name, m in [(GLOBAL, glob), *per_institution]:
        for metric in ("accuracy", "loss"):
            rows.append(keys | {"round": r, "institution": name, "discipline": discipline[name],
                                "metric": metric, "value": float(m[metric])})
    return rows


def _progress(scores: list[dict]) -> dict[str, float]:
    """The numbers a progress line and a Tune report show."""
    acc = {row["institution"]: row["value"] for row in scores if row["metric"] == "accuracy"}
    loss = {row["institution"]: row["value"] for row in scores if row["metric"] == "loss"}
    inst = [v for k, v in acc.items() if k != GLOBAL]
    return {"global_accuracy": acc[GLOBAL], "global_loss": loss[GLOBAL],
            "mean_accuracy": float(np.mean(inst)), "worst_accuracy": float(np.min(inst))}


def _institution_row(keys: dict, s: InstitutionSpec, fed: Federation) -> dict:
    """One row of institutions.parquet."""
    shard = next(sh for sh in fed.shards if sh.name == s.name)
    return keys | {
        "institution": s.name, "discipline": s.discipline, "share": s.share,
        "train_samples": shard.num_train, "test_samples": len(shard.y_test),
        "label_skew": math.nan if s.label_skew is None else s.label_skew, "feature_skew": s.feature_skew,
        "cpus": s.cpus, "gpus": s.gpus, "behaviour": s.behaviour,
    }
