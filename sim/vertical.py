"""The vertical runner: one simulation of institutions that hold different views of the same entities.

:func:`sim.engine.run` hands a run over here when ``data.views`` is set. Read it top to bottom:
build each institution's view, align the entities by private set intersection, split the aligned
entities, then each round train an epoch of per-batch exchanges (:class:`agents.schemes.split_learning.SplitModel`),
score, and book what crossed. The tables are the horizontal engine's (:mod:`sim.core.results`), so
``sim.compare``, ``sim.contribution`` and the report read them as any run's.

- Entities: every run of a seed trains and is scored on the entities all institutions hold (the intersection),
  split into train, validation and test by the label holder's stream, so the isolated baseline, the
  collaboration, pooled views and every coalition differ only in the views they use.
- Round 0 scores the untrained model of all views, the same for every scheme and coalition (the value of no
  collaboration for Shapley); a coalition without the label holder has no labels and never trains.
- Booked in round 1: the PSI messages (split_learning, pooled) and pooled's raw features; every round, each
  non-label-holder's embeddings up and gradients down (and embeddings for scoring); the label holder is the
  hub, as the coordinator is in horizontal runs, so its own row books its compute and no bytes.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sim.core.clock import compute_seconds, transfer_seconds
from sim.core.config import RunSpec
from sim.core.data.partition import SPLIT, num_test, stream
from sim.core.data.views import Views, build as build_views
from sim.core.results import frame, select_rounds
from sim.core.types import GLOBAL, ConfigError, listing

log = logging.getLogger("collabsim")


def run_views(spec: RunSpec, out: Path | None) -> Any:
    """Run one vertical simulation (scheme isolated, split_learning or pooled) and write its run directory."""
    from agents.schemes.psi import align
    from agents.schemes.split_learning import FLOAT, SplitLearning, SplitModel, epoch_bytes, layout
    from sim.engine import RunResult, _open, _status_writer, write_run

    torch.set_num_threads(spec.engine.threads_per_institution)
    # 1. Each institution's view; who takes part (a coalition of sim.contribution: spec.only).
    views = build_views(spec.data, spec.scenario, spec.seed, smoke=spec.smoke)
    parties, holder = tuple(spec.scenario.names), views.label_holder
    members = spec.only or parties
    arch = SplitLearning(**{k: v for k, v in spec.scheme.items() if k != "_target_"}) \
        if spec.scheme_name == "split_learning" else SplitLearning()  # the baselines: the same bottoms and top
    blocks = layout(spec.scheme_name, parties, holder, members)
    # 2. Entity alignment: the entities every institution holds, by DH-PSI (the same for every scheme of a seed).
    alignment = align({p: views.of(p).ids for p in parties}, holder, spec.seed)
    rows = alignment.rows
    _report_alignment(views, rows, holder)
    y = views.y[rows[holder]]
    x = {p: views.of(p).x[rows[p]] for p in parties}
    # 3. Train, validation and test entities, drawn by the label holder.
    split = _split(len(y), spec.data["test_fraction"], spec.data.get("val_fraction", 0.0), spec.seed)
    num_classes = len(views.classes)
    plain = SplitLearning(embedding_dim=arch.embedding_dim, top_hidden=arch.top_hidden)  # no noise: round 0 alike
    everyone = layout("split_learning" if len(parties) > 1 else "isolated", parties, holder, parties)
    untrained = SplitModel(everyone, x, holder, num_classes, hidden=_hidden(spec), scheme=plain, training=spec.training,
                           seed=spec.seed)
    model = SplitModel(blocks, x, holder, num_classes, hidden=_hidden(spec), scheme=arch, training=spec.training,
                       seed=spec.seed) if blocks else None
    crossing = spec.scheme_name != "isolated" and len({p for b in blocks for p in b.views}) > 1
    keys = {"run_id": spec.run_id, "scheme": spec.scheme_name, "scenario": spec.scenario.name, "seed": spec.seed}
    discipline = {s.name: s.discipline for s in spec.scenario.institutions} | {GLOBAL: GLOBAL}
    specs = {s.name: s for s in spec.scenario.institutions}
    _open(out, spec)
    mark = _status_writer(out, spec)
    mark("running", 0)
    metrics, ledger, sim_time = _scores(keys, 0, untrained, split, y, holder, discipline), [], 0.0
    wall0 = time.perf_counter()
    try:
        for r in range(1, spec.rounds + 1):
            # 4. training.local_epochs epochs of per-batch exchanges (none without the label holder: no labels).
            epochs = spec.training.local_epochs if model else 0
            loss, batches = math.nan, 0
            for e in range(epochs):
                loss, b = model.epoch(split["train"], y[split["train"]], r, e)
                batches += b
            score = r % spec.engine.eval_every == 0 or r == spec.rounds
            scored = len(split["val"]) + len(split["test"]) if score and model else 0
            moved = {p: (up * epochs, down * epochs) for p, (up, down) in
                     epoch_bytes(blocks, holder, len(split["train"]), arch.embedding_dim).items()} if model else {}
            # 5. The ledger: what each institution sent and received, its compute and simulated time.
            round_rows = []
            for p in parties:
                up, down = moved.get(p, (0, 0))
                if p in moved and p != holder:
                    up += FLOAT * arch.embedding_dim * scored
                first = (0, 0)
                if r == 1 and crossing and p != holder:  # the alignment and (pooled) the raw views, once, on the
                    first = alignment.bytes_of(p)                    # partner's row (the hub's row books none)
                    if spec.scheme_name == "pooled" and p != holder and p in members:
                        first = (first[0] + FLOAT * x[p].size, first[1])
                work = model.flops.get(p, 0) if model else 0
                processed = len(split["train"]) * epochs if p in moved else 0
                compute = compute_seconds(specs[p], processed, work) + (
                    compute_seconds(specs[p], scored, work) / 3 if scored and p in moved else 0.0)
                transfer = batches * transfer_seconds(specs[p], up // max(batches, 1), down // max(batches, 1)) \
                    if up or down else 0.0
                transfer += transfer_seconds(specs[p], *first)
                total = compute + transfer
                took_part = p in moved or first != (0, 0)
                round_rows.append(keys | {
                    "round": r, "institution": p, "participated": took_part, "bytes_up": up + first[0],
                    "bytes_down": down + first[1], "compute_seconds": 0.0, "simulated_seconds": total,
                    "sim_compute_seconds": compute, "trained_by": p, "data_bytes": 0, "compute_given_seconds": 0.0,
                    "compute_taken_seconds": 0.0, "solo_seconds": total, "samples": processed,
                    "epsilon": math.nan, "staleness": math.nan, "status": "ok" if took_part else "idle",
                    "work_done": 1.0 if p in moved else 0.0})
            # Per batch the label holder waits for the slowest party, then runs the top: the round is the slowest row.
            sim_time += max(row["simulated_seconds"] for row in round_rows)
            ledger += [row | {"sim_time": sim_time} for row in round_rows]
            if model:
                metrics.append(keys | {"round": r, "institution": holder, "discipline": discipline[holder],
                                       "metric": "train_loss", "value": loss})
            # 6. Score the model the collaboration ends the round with (the untrained one without the label holder).
            if score:
                metrics += _scores(keys, r, model or untrained, split, y, holder, discipline)
            log.info("[%s] round %d/%d  loss %.3f  simulated %.1fs  wall %.1fs", spec.scheme_name, r, spec.rounds, loss,
                     sim_time, time.perf_counter() - wall0)
    except BaseException as e:
        mark("failed", 0, e)
        raise
    # 7. Tidy tables out.
    table = frame("metrics", metrics)
    table["selected"] = select_rounds(table, spec.select)
    result = RunResult(run_id=spec.run_id, metrics=table, ledger=frame("ledger", ledger),
                       institutions=frame("institutions", _institutions(keys, spec, split, rows, views, members)),
                       config=dict(spec.config))
    if out is not None:
        write_run(out, result, spec.config)
        mark("complete", spec.rounds)
    return result


def _hidden(spec: RunSpec) -> list[int]:
    """Hidden widths of each bottom model: model=mlp's."""
    hidden = spec.model.get("hidden", [64])
    return [int(h) for h in (hidden if isinstance(hidden, (list, tuple)) else [hidden])]


def _split(n: int, test_fraction: float, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Aligned entities (positions) into train, validation and test, drawn from the label holder's stream."""
    order = stream(seed, SPLIT, 0).permutation(n)
    test = num_test(n, test_fraction)
    val = num_test(n - test, val_fraction) if val_fraction > 0 else 0
    parts = {"test": np.sort(order[:test]), "val": np.sort(order[test:test + val]),
             "train": np.sort(order[test + val:])}
    if min(len(parts["test"]), len(parts["train"])) < 2:
        raise ConfigError("data.views", f"the institutions hold {n} entities in common, too few to train and test on; "
                          "raise data.overlap or give the views more entities")
    return parts


def _scores(keys: dict, r: int, model: Any, split: dict, y: np.ndarray, holder: str, discipline: dict) -> list[dict]:
    """Metric rows of one scoring: the one model, as the global row and the label holder's."""
    acc, loss = model.score(split["test"], y[split["test"]], r)
    values = {"accuracy": acc, "loss": loss}
    if len(split["val"]):
        values["val_accuracy"], values["val_loss"] = model.score(split["val"], y[split["val"]], r)
    return [keys | {"round": r, "institution": who, "discipline": discipline[who], "metric": m, "value": float(v)}
            for who in (GLOBAL, holder) for m, v in values.items()]


def _report_alignment(views: Views, rows: dict, holder: str) -> None:
    """Say how many entities each institution drops at alignment; refuse when none align."""
    aligned = len(rows[holder])
    if aligned == 0:
        raise ConfigError("data.views", "no entity is held by every institution (the private set intersection is "
                          "empty); check data.entity_column and data.overlap")
    drops = [f"{v.party} {len(v.ids) - aligned} of {len(v.ids)}" for v in views.views if len(v.ids) > aligned]
    if drops:
        log.info("entity alignment: %d entities held by every institution; dropped: %s", aligned, listing(drops, 8))


def _institutions(keys: dict, spec: RunSpec, split: dict, rows: dict, views: Views, members) -> list[dict]:
    """One row per institution: what it holds of the aligned entities (train/test rows it takes part in)."""
    out = []
    for s in spec.scenario.institutions:
        out.append(keys | {
            "institution": s.name, "discipline": s.discipline, "share": s.share,
            "train_samples": len(split["train"]), "test_samples": len(split["test"]),
            "classes": len(np.unique(views.y[rows[views.label_holder]][split["train"]])) if s.name == views.label_holder
            else None, "label_skew": math.nan, "feature_skew": 0.0, "cpus": s.cpus, "gpus": s.gpus,
            "behaviour": s.behaviour, "availability": s.availability, "failure_rate": s.failure_rate, "speed": s.speed})
    return out
