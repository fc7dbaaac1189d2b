"""The round loop: one simulation from a config to tidy results.

``run(cfg)`` is a plain function; ``python -m sim`` is a thin Hydra wrapper around it.
Read it top to bottom: validate, build data, place actors, then each round select,
train, merge, score, book-keep and checkpoint. A run directory always says how far its
run got (``status.json``); a stopped run continues from its last checkpoint
(``python -m sim resume=RUN_DIR``) to the very numbers it would have produced.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.core import checkpoint, rundir
from sim.core.caveats import caveats
from sim.core.checkpoint import Progress
from sim.core.heartbeat import Heartbeat
from sim.checks import load_spec
from sim.core.config import RunSpec
from sim.core.data import build_federation
from sim.core.models import build_model, model_flops
from sim.core.results import frame, select_rounds, write_table, write_text
from sim.core.stragglers import round_end
from sim.core.types import GLOBAL, IDLE_ROWS, Federation, InstitutionSpec, RunFailed, Scores, Shard, Snapshot

log = logging.getLogger("collabsim")
SCORES = ("accuracy", "loss", "val_accuracy", "val_loss", "backdoor_success")
"""Metrics of a scored round: on the test split, then on the validation split (what model selection sees); with a
data-poisoning institution, the global model's attack success rate on the triggered global test set."""
OWN_SCORES = ("global_accuracy", "global_loss")
"""Kept for each institution too when institutions train architectures of their own (scenario rows' ``model``): its
model's scores on the global test set, where 'each institution alone' and 'each with the consortium' compare."""


@dataclass
class RunResult:
    """The tidy tables of one run (see sim/core/results.py for the schema)."""

    run_id: str
    metrics: pd.DataFrame
    ledger: pd.DataFrame
    institutions: pd.DataFrame
    config: Mapping[str, Any] = field(default_factory=dict)  # the resolved config it ran with

    def caveats(self) -> list[str]:
        """What the run means that its numbers alone do not show (:mod:`sim.core.caveats`), for its summary."""
        return caveats([self.config], self.institutions, self.metrics)


def run(
    cfg: DictConfig | Mapping[str, Any] | RunSpec,
    out_dir: str | Path | None = None,
    *,
    backend: str | None = None,
    institutions: tuple[str, ...] | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    pool: Any = None,
    early: Early | None = None,
) -> RunResult:
    """Run one simulation; write its run directory if ``out_dir`` is given (``resume=DIR`` continues DIR).

    ``backend`` overrides ``engine.backend``; ``pool`` (an :class:`agents.runtime.warm.ActorPool`) lends warm
    actors, so a command that runs many simulations starts its processes once; ``early`` (:func:`start_early`) lends
    the data and the actors made for this run before its config was composed again.
    """
    # 1. Validate everything before any actor starts; a resumed run takes its saved config and checkpoint.
    spec, out = _prepare(cfg, out_dir, institutions)
    specs = _members(spec)
    if early is not None:
        pool = pool or early.pool
    if spec.resume and checkpoint.read_status(out).get("state") == "complete":
        log.info("[%s] %s is complete; nothing to resume", spec.scheme_name, out)
        return _read_run(spec.run_id, out, spec.config)
    if spec.data.get("views"):  # institutions hold different views of the same entities: per-batch exchange (a
        # stopped one starts again: its epochs take seconds)
        from sim.vertical import run_views

        return run_views(spec, out)
    # 2. Data: every institution's shard and the global test set (the same whatever the coalition); built before the
    #    run directory is written, so a refusal of the data (a poisoner's target label, say) leaves nothing behind.
    if early is not None and _data_key(early.spec) == _data_key(spec):
        fed, flops = early.fed, early.flops
    else:
        fed, flops = _build_data(spec, specs)
    progress, snapshot = _open(out, spec)
    mark = _status_writer(out, spec)
    mark("running", progress.rounds_done)
    keys = {"run_id": spec.run_id, "scheme": spec.scheme_name, "scenario": spec.scenario.name, "seed": spec.seed}
    record = _Recorder(keys, specs, progress)
    progress.names = pd.array([s.name for s in specs], dtype="string")  # who a round did not pick comes by position
    runner, wall0, summary = None, time.perf_counter(), {}
    beat = Heartbeat(f"[{spec.scheme_name}]").start()  # a step over 10 s says so (loading the model, scoring, ...)
    try:
        # 3. Place hosts and coordinator; a resumed run puts back their state.
        beat.phase("starting the institutions and loading the model into them")
        runner = _start_backend(backend or spec.engine.backend, spec, specs, fed, flops, pool)
        if snapshot is not None:
            runner.restore(snapshot)
        for r in range(progress.rounds_done + 1, spec.rounds + 1):
            # 4. The scheme picks the cohort and the local plan; the fault model drops who will not deliver.
            ctx = runner.begin_round(r, progress.sim_time)
            if r == 1:
                beat.phase("scoring the starting model (round 0)")
                record.scores(0, runner.evaluate(ctx.plan), check=False)
            beat.phase(f"training and merging round {r}/{spec.rounds}")
            # 5. Local steps fan out; the coordinator merges what arrived, in scenario order.
            # Scored every engine.eval_every rounds and in the last; eval_scope=cohort scores only who trained this
            # round (large populations), everybody in the last.
            score = r % spec.engine.eval_every == 0 or r == spec.rounds
            only = frozenset(ctx.cohort) if spec.engine.eval_scope == "cohort" and r < spec.rounds else None
            rows = runner.train_and_merge(ctx, score, only)
            # 6. The round lasts as long as its slowest participant (synchronous rounds), at most engine.round_deadline_s;
            #    an asynchronous scheme's round ends when the update it merged arrived (round_end, on the coordinator's row).
            progress.sim_time = round_end(rows, progress.sim_time, spec.engine.round_deadline_s)
            for row in rows:
                row.pop("round_end", None)
            idle, idle_epsilon = next((row.pop(IDLE_ROWS) for row in rows if IDLE_ROWS in row), ((), None))
            losses = record.losses(r, rows)
            progress.add("ledger", [keys | {"round": r, "epsilon": math.nan, "staleness": math.nan} | row
                                    | {"sim_time": progress.sim_time} for row in rows])
            progress.add_idle(keys, r, progress.sim_time, np.asarray(idle, dtype=np.int64),
                              math.nan if idle_epsilon is None else idle_epsilon)
            # 7. Score the models everybody ends the round with (every engine.eval_every rounds, and the last).
            if score:
                summary = record.scores(r, runner.evaluate(ctx.plan, only), losses) | {"round": r}
            progress.rounds_done = r
            dropped = sum(row["status"] not in ("ok", "idle") for row in rows)
            scored = (f"global acc {summary['global_accuracy']:.3f}  mean institution acc {summary['mean_accuracy']:.3f}"
                      if summary.get("round") == r else "not scored (engine.eval_every)")
            line = ("[%s] round %d/%d  %s  cohort %d%s  simulated %.1fs  wall %.1fs", spec.scheme_name, r, spec.rounds,
                    scored, len(ctx.cohort), f" (dropped {dropped})" if dropped else "", progress.sim_time,
                    time.perf_counter() - wall0)
            # 8. Every checkpoint_every rounds, save all that persists: taken now, written while the next round runs.
            #    Its status and its progress line follow once it is on disk, and a later round's line follows them:
            #    a line on screen still means its round is safe.
            if out is not None and spec.checkpoint_every and r % spec.checkpoint_every == 0 and r < spec.rounds:
                checkpoint.save(out, progress, runner.save(), spec.run_id,
                                then=lambda r=r, line=line: (mark("running", r), log.info(*line)))
            else:  # behind a checkpoint still being written, the line waits for it; the next round does not
                progress.after(lambda line=line: log.info(*line))
            beat.touch()
            if on_round is not None and summary:
                on_round(r, summary)
    except BaseException as e:
        try:
            progress.wait()  # a checkpoint being written lands first (its own failure is what stops the run, if any)
        except BaseException:  # noqa: BLE001 - the run's error is the one to report
            pass
        mark("failed", progress.rounds_done, e)
        raise
    finally:
        beat.stop()
        if runner is not None:
            runner.close()

    # 9. Tidy tables out; then, and only then, the run directory says complete.
    shards = {sh.name: sh for sh in fed.shards}
    metrics = progress.table("metrics")
    metrics["selected"] = select_rounds(metrics, spec.select)
    result = RunResult(
        run_id=spec.run_id,
        metrics=metrics,
        ledger=progress.table("ledger"),
        institutions=frame("institutions", [_institution_row(keys, s, shards[s.name]) for s in specs]),
        config=dict(spec.config),
    )
    if out is not None:
        write_run(out, result, spec.config)
        mark("complete", spec.rounds)
        checkpoint.clear(out)
    return result


def write_run(out_dir: Path, result: RunResult, cfg: Any) -> None:
    """Write a run directory: resolved config and the three tables, each atomically."""
    if isinstance(cfg, DictConfig):
        write_text(OmegaConf.to_yaml(cfg, resolve=True), out_dir / "config.yaml")
    elif isinstance(cfg, Mapping) and cfg:
        write_text(OmegaConf.to_yaml(OmegaConf.create(dict(cfg))), out_dir / "config.yaml")
    write_table(result.metrics, out_dir / "metrics.parquet")
    write_table(result.ledger, out_dir / "ledger.parquet")
    write_table(result.institutions, out_dir / "institutions.parquet")


def _prepare(cfg: Any, out_dir: str | Path | None, institutions: tuple[str, ...] | None) -> tuple[RunSpec, Path | None]:
    """The validated spec and the run directory; ``resume=DIR`` means DIR, with the coalition its run had."""
    spec = cfg if isinstance(cfg, RunSpec) else load_spec(cfg)
    out = Path(spec.resume) if spec.resume else None if out_dir is None else Path(out_dir)
    if spec.resume:
        institutions = institutions or checkpoint.read_status(out).get("institutions")
    elif out is not None:
        rundir.check_fresh(out, spec.overwrite)  # nothing in it is touched before this
    return (spec if institutions is None else spec.restrict(tuple(institutions))), out


def _open(out: Path | None, spec: RunSpec) -> tuple[Progress, Snapshot | None]:
    """Mark the run directory running: a fresh run writes its config, a resumed one reads its last checkpoint."""
    if out is None:
        return Progress(), None
    rundir.acquire(out)  # released when status.json says complete or failed
    try:
        if not spec.resume:  # checked again under the lock: another run may have started here meanwhile
            rundir.check_fresh(out, spec.overwrite)
        saved = checkpoint.load(out, spec.run_id) if spec.resume else None
    except BaseException:
        rundir.release(out)
        raise
    progress, snapshot = saved or (Progress(), None)
    if spec.resume:
        log.info("[%s] resuming %s after round %d", spec.scheme_name, out, progress.rounds_done)
    else:
        if spec.overwrite or rundir.refused(out):
            rundir.clear(out)  # overwrite=true, or a run refused before its first round: its files go, a user's stay
        rundir.write_marker(out, rundir.RUN_MARKER, run_id=spec.run_id, config=dict(spec.config))
        write_text(OmegaConf.to_yaml(OmegaConf.create(dict(spec.config))), out / "config.yaml")
    return progress, snapshot


def _status_writer(out: Path | None, spec: RunSpec) -> Callable[..., None]:
    """``mark(state, rounds_done, error=None)``: keep the run directory's status.json current (no-op without one)."""

    def mark(state: str, rounds_done: int, error: BaseException | None = None) -> None:
        if out is None:
            return
        lines = [] if error is None else str(error).strip().splitlines()
        why = None if error is None else f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        checkpoint.write_status(out, state, run_id=spec.run_id, rounds=spec.rounds, rounds_done=rounds_done,
                                error=why, institutions=spec.only)
        if state != "running":  # the run is over: another may use the directory (resume it)
            rundir.release(out)

    return mark


def _members(spec: RunSpec) -> tuple[InstitutionSpec, ...]:
    """The run's institutions (its coalition's, or the whole scenario's), in scenario order."""
    members = set(spec.only or spec.scenario.names)
    return tuple(s for s in spec.scenario.institutions if s.name in members)


def _build_data(spec: RunSpec, specs: tuple[InstitutionSpec, ...]) -> tuple[Federation, int]:
    """Every institution's shard and the global test set (the same whatever the coalition), and the model's FLOPs
    per sample; raises ConfigError where the data refuse the config."""
    with Heartbeat(f"[{spec.scheme_name}]") as beat:  # a step over 10 s says so (tokenising, a corpus, ...)
        beat.phase(f"building the data ({len(specs)} institutions)")
        fed = build_federation(spec.data, spec.scenario, spec.seed, smoke=spec.smoke, model=spec.model)
        flops = model_flops(build_model(spec.model, fed.input_shape, fed.num_classes, seed=spec.seed), fed.input_shape)
    return fed, flops


def _data_key(spec: RunSpec) -> tuple:
    """What the data and the FLOPs are built from."""
    return (spec.data, spec.scenario, spec.seed, spec.smoke, spec.model)


@dataclass
class Early:
    """A run's data and actors, made by :func:`start_early` before its command composed the config again."""

    spec: RunSpec
    fed: Federation
    flops: int
    pool: Any  # an agents.runtime.warm.ActorPool holding the run's actors, idle until the run borrows them

    def close(self) -> None:
        """End the actors (the run has given them back)."""
        self.pool.close()


def start_early(spec: RunSpec) -> Early | None:
    """Build a run's data, join the warm local cluster and ask it for the run's actors, right after the command's
    config was checked: Hydra then composes the config again (twice, about 0.2 s) while Ray starts them, where the
    run would otherwise wait for them. None, with nothing started, where the run would not join a warm cluster (the
    in-process backend, a cluster of its own or at an address, a resumed run); nothing here outlives the command.

    The data come first, so a config the data refuse (ConfigError, one line) still stops the command before any
    actor starts. The run lays its actors out again and borrows these where the requests match."""
    from agents.runtime import cluster
    from agents.runtime.placement import plan_layout
    from agents.runtime.warm import ActorPool

    wanted = dict(spec.cluster)
    if (spec.engine.backend != "ray" or spec.resume or spec.data.get("views") or wanted.get("address")
            or os.environ.get("RAY_ADDRESS")):
        return None
    if cluster.joinable(wanted) is None:  # none up, it does not answer, or the run asks for one of its own: it says why
        return None
    specs = _members(spec)
    fed, flops = _build_data(spec, specs)
    pool = None
    try:
        cpus, gpus = cluster.connect(wanted, say_joined=False)  # said when the run connects, where its log begins
        layout = plan_layout(spec, specs, cpus, gpus, cluster.node_cpus())
        pool = ActorPool()
        pool.give_back((layout.coordinator_cpus, pool.coordinator(layout.coordinator_cpus)),
                       [((h.cpus, h.gpus), pool.host(h.cpus, h.gpus)) for h in layout.hosts])
    except Exception as e:  # noqa: BLE001 - the run starts its actors itself and reports what fails there
        log.debug("could not start the run's actors early: %s", e)
        if pool is not None:
            pool.close()
        return None
    return Early(spec, fed, flops, pool)


def _read_run(run_id: str, out: Path, config: Mapping[str, Any]) -> RunResult:
    """The tables of a complete run directory."""
    tables = {k: pd.read_parquet(out / f"{k}.parquet") for k in ("metrics", "ledger", "institutions")}
    return RunResult(run_id=run_id, **tables, config=dict(config))


def _start_backend(kind: str, spec: RunSpec, specs: tuple[InstitutionSpec, ...], fed: Federation, flops: int,
                   pool: Any = None):
    """The in-process backend, or Ray actors placed per the layout (borrowed from ``pool`` when given)."""
    from agents.runtime.backend import InProcessBackend, RayBackend
    from agents.runtime.cluster import connect, node_cpus
    from agents.runtime.placement import plan_layout

    if kind == "inprocess":
        return InProcessBackend(spec, specs, fed, flops)
    cpus, gpus = connect(dict(spec.cluster))
    layout = plan_layout(spec, specs, cpus, gpus, node_cpus())
    for w in layout.warnings:
        log.warning(w)
    log.info("[%s] %d institutions on %d %s host actor(s) + coordinator", spec.scheme_name, len(specs),
             len(layout.hosts), layout.mode)
    runner = RayBackend(spec, specs, fed, flops, layout, pool)
    if any(h.gpus for h in layout.hosts):
        log.info("[%s] hosts train on %s", spec.scheme_name, ", ".join(runner.devices()))
    return runner


class Diverged(RunFailed):
    """A metric turned NaN or infinite: the run stops, since more rounds cannot mend it."""


METRIC_NAMES = (*SCORES, "train_loss", *OWN_SCORES)
"""Every metric a run records, in the order a round's rows list them (an institution's scores, then training loss)."""


class _Recorder:
    """Keeps a round's scores and training losses as metric rows in arrays (Progress.add_scores), and reads the
    progress line's numbers and the divergence check off the same arrays."""

    def __init__(self, keys: dict, specs: Sequence[InstitutionSpec], progress: Progress):
        self.keys, self.progress = keys, progress
        # Scenario index -> row in labels (0 is the global row; a coalition holds some of the scenario's institutions).
        self.position = np.zeros(max((s.index for s in specs), default=0) + 1, dtype=np.int64)
        self.position[[s.index for s in specs]] = np.arange(1, len(specs) + 1)
        self.by_name = {s.name: k + 1 for k, s in enumerate(specs)}
        # architectures of their own: each institution's model on the global sets is kept too (OWN_SCORES)
        self.own = OWN_SCORES if any(s.model is not None for s in specs) else ()
        progress.labels = pd.array([GLOBAL, *(s.name for s in specs)], dtype="string")
        progress.disciplines = pd.array([GLOBAL, *(s.discipline for s in specs)], dtype="string")
        progress.metric_names = METRIC_NAMES

    def scores(self, r: int, evaluated: tuple[Mapping[str, float], Scores], losses: tuple | None = None,
               check: bool = True) -> dict[str, float]:
        """Record one round's evaluation (the global row first, then each institution in scenario order, each metric
        in ``SCORES`` order); with ``check``, stop on a score (or a training loss in ``losses``) that is not finite;
        return the numbers a progress line shows."""
        glob, each = evaluated
        if "global_accuracy" in each.columns and each.present("global_accuracy").all():
            # No merged model (e.g. isolated): the global row averages the institutions' own models.
            glob = {metric: float(np.mean(each.columns[f"global_{metric}"])) for metric in SCORES
                    if f"global_{metric}" in each.columns and each.present(f"global_{metric}").all()}
        metrics = [m for m in SCORES if m in glob or m in each.columns] + [m for m in self.own if m in each.columns]
        codes = [METRIC_NAMES.index(m) for m in metrics]
        n = len(each.index)
        values = np.empty((n + 1, len(codes)))
        present = np.empty((n + 1, len(codes)), dtype=bool)
        for c, metric in enumerate(metrics):
            values[0, c], present[0, c] = glob.get(metric, np.nan), metric in glob  # glob holds SCORES only
            values[1:, c] = each.columns.get(metric, np.nan)
            present[1:, c] = each.present(metric)
        who, col = np.nonzero(present)  # row-major: institution by institution, metrics in order
        positions = np.concatenate([[0], self.position[each.index]])
        which, value = np.array(codes, dtype=np.int8)[col], values[who, col]
        if check:
            if losses is not None:
                self.check(r, *losses)
            self.check(r, positions[who], which, value)
        self.progress.add_scores(self.keys, r, positions[who], which, value)
        acc = values[:, metrics.index("accuracy")]
        return {"global_accuracy": float(acc[0]), "global_loss": float(values[0, metrics.index("loss")]),
                "mean_accuracy": float(np.mean(acc[1:])), "worst_accuracy": float(np.min(acc[1:]))}

    def losses(self, r: int, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Record the ``train_loss`` of the participants that report one (taken out of their ledger rows); returns
        them as (who, which, values) for the divergence check."""
        named = [(row["institution"], loss) for row in rows
                 if not math.isnan(loss := row.pop("train_loss", math.nan)) and row["participated"]]
        who = np.array([self.by_name[n] for n, _ in named], dtype=np.int64)
        which = np.full(len(named), METRIC_NAMES.index("train_loss"), dtype=np.int8)
        values = np.array([v for _, v in named], dtype=np.float64)
        self.progress.add_scores(self.keys, r, who, which, values)
        return who, which, values

    def check(self, r: int, who: np.ndarray, which: np.ndarray, values: np.ndarray) -> None:
        """Stop the run (status failed) at the first NaN or infinite score or training loss, naming round and
        institution (``who`` indexes the run's labels, ``which`` METRIC_NAMES)."""
        bad = ~np.isfinite(values) & (which != METRIC_NAMES.index("backdoor_success"))
        if bad.any():
            k = int(np.argmax(bad))
            raise Diverged(f"round {r}: the {METRIC_NAMES[int(which[k])]} of institution "
                           f"'{self.progress.labels[int(who[k])]}' is {values[k]}; "
                           "the model diverged: lower training.lr or check the data for extreme values")


def _institution_row(keys: dict, s: InstitutionSpec, shard: Shard) -> dict:
    """One row of institutions.parquet."""
    return keys | {
        "institution": s.name, "discipline": s.discipline, "share": s.share,
        "train_samples": shard.num_train, "test_samples": len(shard.y_test),
        "classes": int(len(np.unique(shard.y_train))),
        "label_skew": math.nan if s.label_skew is None else s.label_skew, "feature_skew": s.feature_skew,
        "cpus": s.cpus, "gpus": s.gpus, "behaviour": s.behaviour,
        "availability": s.availability, "failure_rate": s.failure_rate, "speed": s.speed,
    }
