"""``python -m sim.sweep sweep=<name>``: Ray Tune over schemes, hyperparameters and seeds.

Every trial is a whole simulation: Hydra composes its config from the run config, the
sweep file's overrides, the command line and the trial's values; :func:`sim.engine.run`
runs it and reports each round to Tune. With ``sweep.backend: inprocess`` (the default)
the trial's own process runs the simulation on the one core it reserves, and Tune reuses
that process for the next trial, so torch is imported once per core, not once per trial.
With ``sweep.backend: ray`` each trial reserves a placement group (its own small bundle,
then the run's coordinator and hosts as ``plan_layout`` lays them out), and the engine's
actors are captured into it, so trials never oversubscribe the cluster and as many run at
once as fit. The sweep directory (Hydra's run directory) holds Tune's
files (``tune/``), one run directory per trial (``trials/<trial_id>/``), ``trials.parquet``
(one row per trial) and the trials' tables concatenated, so ``python -m analysis report``
reads a sweep as it reads a run.

The package: this module runs the sweep (resources, the trial, Tune); :mod:`sim.sweep.space`
reads a sweep file into the trials' configurations; :mod:`sim.sweep.results` turns the
trials into tables and the console's lines; ``__main__`` is the command.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.cli import SEARCH_PATH, compose, explain, searchpath_override
from sim.checks import load_spec
from sim.core import rundir
from sim.core.results import write_csv, write_table, write_text
from sim.sweep.space import (INDEX, VARIANT, SweepSpec, check_points, duration, load_sweep, param_space, trial_overrides,
                              trial_values, variant_label)
from sim.sweep.design import DESIGN_FILE, record
from sim.sweep.results import TIMES, collect, finished, progress_line, read_text, render, replay, summarize
from sim.tracking import flatten, parse as parse_tracking
from sim.core.types import ConfigError

log = logging.getLogger("collabsim")
# A sweep started before these modules moved into sim/sweep/ saved Tune's state naming their old paths: resuming
# it unpickles them from there.
sys.modules.setdefault("sim.search_space", sys.modules["sim.sweep.space"])
sys.modules.setdefault("sim.sweep_results", sys.modules["sim.sweep.results"])
TUNE_DIR = "tune"  # Tune's own files, inside the sweep directory
SWEEP_KEYS = ("sweep", "resume", "sweep_trust")  # command-line keys of the sweep itself, not of its trials


# ---- configs -------------------------------------------------------------------------------------

def base_overrides(spec: SweepSpec, command_line: list[str]) -> list[str]:
    """What every trial starts from: the sweep file's overrides, then the command line's (minus the sweep's own keys).

    The user's config folders (``--config-dir``) come first, as an override: trials compose in other processes.
    """
    own = [o for o in command_line if _key(o).split(".")[0] not in SWEEP_KEYS]
    return [*([searchpath_override(SEARCH_PATH)] if SEARCH_PATH else []), *spec.overrides, *own]


def trial_config(base: list[str], values: Mapping[str, Any], variants: Mapping[str, tuple[str, ...]] | None = None) -> DictConfig:
    """Compose one trial's run config; later overrides of the same key win (the trial's values last)."""
    overrides = [*base, *trial_overrides(values, variants)]
    last = {_key(o): o for o in overrides}
    return compose("config", list(last.values()))


def check(cfg: DictConfig, command_line: list[str]) -> SweepSpec:
    """Validate the sweep file and a trial config for every listed value, before Ray starts (raises ConfigError)."""
    spec = load_sweep(OmegaConf.to_container(cfg.sweep, resolve=True), smoke=bool(cfg.get("smoke")))
    if not isinstance(cfg.get("resume"), bool):
        raise ConfigError("resume", f"expected true or false, got {cfg.get('resume')!r}")
    if spec.bundles == "per_host" and not _pins_bundles():
        raise ConfigError("sweep.bundles", "per_host needs an engine that places each actor in its own bundle "
                          "(agents.runtime.backend.RayBackend.pins_bundles); use merged")
    _check_trial_cpus(spec, cfg)
    base = base_overrides(spec, command_line)
    if spec.search == "sobol":
        levers = {d.key for d in spec.drawn}  # the config's own values of the levers, to read their types
        check_lever_types(spec, trial_config(base, {k: v for k, v in next(check_points(spec)).items() if k not in levers},
                                             spec.variants))
    for values in check_points(spec):
        try:
            load_spec(trial_config(base, values, spec.variants))
        except ConfigError as e:
            raise ConfigError(_where(spec, e.key), e.problem) from None
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors become one line naming the key
            key, _, problem = explain(e).partition(": ")
            raise ConfigError(_where(spec, key), problem) from None
    return spec


def check_lever_types(spec: SweepSpec, trial: DictConfig) -> None:
    """Refuse a lever whose range cannot give its key's type: a design draws values inside ranges, so a float range on
    a whole-number key would compose at both ends (what check_points tries) and fail at a point in between."""
    for d in spec.drawn:
        value = OmegaConf.select(trial, d.key, default=None)  # null keys (a deadline, say) take any number
        if isinstance(value, bool) or (value is not None and not isinstance(value, (int, float))):
            raise ConfigError(f"sweep.space.{d.key}", f"a lever must be a number, and {d.key} is {value!r} in the "
                              "run config; cross its values with {grid: [..]} instead")
        if isinstance(value, int) and d.kind != "randint":
            raise ConfigError(f"sweep.space.{d.key}", f"{d.key} is a whole number in the run config ({value}) and "
                              f"{d.kind} draws fractions; use {{randint: [{d.values[0]:g}, {d.values[1]:g}]}}")


def _check_trial_cpus(spec: SweepSpec, cfg: DictConfig, cluster_cpus: float | None = None) -> None:
    """Refuse a trial reservation larger than the cluster (the local one's size is known before Ray starts):
    an in-process trial uses one core of it, and Tune would otherwise wait for ever or the number was a typo."""
    if spec.trial_cpus is None:
        return
    if cluster_cpus is None:
        if (cfg.get("cluster") or {}).get("address") is not None:
            return  # a remote cluster's size is known once joined: sweep() checks it then
        own = (cfg.get("cluster") or {}).get("num_cpus")
        cluster_cpus = float(os.cpu_count() or 1) if own is None else float(own)
    if spec.trial_cpus > cluster_cpus + 1e-9:
        raise ConfigError("sweep.trial_cpus", f"{spec.trial_cpus:g} is more than the {cluster_cpus:g} CPUs of the "
                          f"cluster; lower it (at most {cluster_cpus:g}), or null to let a trial take the whole cluster")


def _pins_bundles() -> bool:
    """Whether the engine puts each actor in the bundle of its layout; otherwise actors take any bundle with room."""
    from agents.runtime.backend import RayBackend

    return bool(getattr(RayBackend, "pins_bundles", False))


def _where(spec: SweepSpec, key: str) -> str:
    """Name a bad key where the user wrote it: in the sweep's space, its overrides, or the command line."""
    if key in spec.keys:
        return f"sweep.space.{key}"
    sets = lambda overrides: any(_key(o) == key or _key(o).startswith(key + ".") for o in overrides)  # noqa: E731
    for value, overrides in spec.variants.items():
        if sets(overrides):
            return f"sweep.variants.{variant_label(value)}: {key}"
    return f"sweep.overrides: {key}" if sets(spec.overrides) else key


def _key(override: str) -> str:
    """The key an override sets (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


# ---- resources -----------------------------------------------------------------------------------

def trial_bundles(spec: SweepSpec, cfg: DictConfig, cpus: float, gpus: float) -> list[dict[str, float]]:
    """One trial's placement-group bundles: its own process first, then the run's coordinator and hosts.

    The run is laid out as ``python -m sim`` would lay it out on a cluster of
    ``sweep.trial_cpus`` CPUs (less the trial's own bundle). With ``bundles: merged`` the
    run's bundles are summed into one, because the engine's actors take whichever bundle
    of their placement group has room: unequal bundles could be filled in the wrong order
    and strand the largest actor. ``per_host`` keeps one bundle per actor (needs an engine
    that places each actor in its own bundle).
    """
    from agents.runtime.placement import plan_layout

    if spec.backend == "inprocess":  # the trial's process is the whole simulation: it uses one core
        return [{"CPU": min(1.0, spec.trial_cpus or 1.0)}]
    run = load_spec(cfg)
    budget = (spec.trial_cpus if spec.trial_cpus is not None else cpus) - spec.driver_cpus
    layout = plan_layout(run, run.scenario.institutions, budget, gpus)
    bundles = layout.bundles
    if spec.bundles == "merged":
        bundles = [{k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU") if any(b.get(k) for b in bundles)}]
    return [{"CPU": spec.driver_cpus}, *bundles]


def check_fits(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> None:
    """Refuse a trial that no node (or, with STRICT_PACK, no single node) can hold: Tune would wait for ever."""
    total = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    need = [total] if strategy == "STRICT_PACK" else bundles
    for b in need:
        if not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items()) for n in nodes):
            biggest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
            raise ConfigError("sweep.trial_cpus", f"a trial reserves {total['CPU']:g} CPUs and {total['GPU']:g} GPUs "
                              f"({strategy}) but the largest node has {biggest:g} CPUs; lower sweep.trial_cpus or the run's cpus")


# ---- the trial -----------------------------------------------------------------------------------

def quiet_when_ending(unraisable: Any) -> None:
    """``sys.unraisablehook`` of a trial process: silent about the SystemExit by which Ray ends it.

    Tune ends a trial process it no longer needs with SIGTERM, and Ray's handler raises
    SystemExit wherever Python is. Inside a finalizer, Python cannot raise it and prints
    "Exception ignored in ..." with a traceback on the sweep's console, about a process
    that is ending as asked. Anything else goes to Python's own hook.
    """
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def make_trainable(spec: SweepSpec, base: list[str], sweep_dir: Path) -> Callable[[dict], None]:
    """The Tune function trainable: compose the trial's config, run it, report every round."""

    def trial(config: dict) -> None:
        from ray import tune

        from sim.engine import run

        sys.unraisablehook = quiet_when_ending  # this process may be ended, idle, by Tune
        values = trial_values(spec, config)
        cfg = trial_config(base, values, spec.variants)
        run_dir = sweep_dir / "trials" / tune.get_context().get_trial_id()
        rounds, times = load_spec(cfg).rounds, {"started": time.time()}
        last: list[dict] = []

        def report(r: int, summary: dict[str, float]) -> None:
            result = {**summary, "round": r, "rounds": rounds, **times, "finished": time.time()}
            if r < rounds:
                tune.report(result)
            else:  # a scheduler stops a trial at its last report: send it once the run directory is written
                last.append(result)

        if finished(run_dir):  # finished before an interruption that Tune's state did not record: replay, don't rerun
            times = json.loads(read_text(run_dir / TIMES) or "{}") or times
            for r, summary in replay(pd.read_parquet(run_dir / "metrics.parquet")):
                report(r, summary)
        else:
            cfg.overwrite = True  # the trial's own folder: what an interrupted attempt left there is replaced
            run(cfg, run_dir, on_round=report, backend=spec.backend)
            times["finished"] = time.time()
            write_text(json.dumps(times), run_dir / TIMES)
        if last:
            tune.report(last[-1] | times)

    trial.__name__ = trial.__qualname__ = f"sweep_{spec.name}"
    return trial


# ---- the sweep -----------------------------------------------------------------------------------

def sweep(cfg: DictConfig, command_line: list[str], sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or resume) the sweep into ``sweep_dir``; write its tables and return (trials, summary)."""
    import ray
    from ray import tune

    from agents.runtime.cluster import connect

    spec = check(cfg, command_line)
    base = base_overrides(spec, command_line)
    sweep_dir = sweep_dir.resolve()
    tune_dir = sweep_dir / TUNE_DIR
    resume, overwrite = bool(cfg.get("resume")), bool(cfg.get("overwrite", False))
    if resume != tune.Tuner.can_restore(str(tune_dir)) and not (overwrite and not resume):
        raise ConfigError("resume", f"no sweep to resume in {sweep_dir}; check hydra.run.dir" if resume else
                          f"{sweep_dir} already holds a sweep; add resume=true to continue it, overwrite=true to "
                          "replace it, or pick another hydra.run.dir")
    if resume:
        check_trust(sweep_dir, bool(cfg.get("sweep_trust", False)))
    else:
        rundir.check_fresh(sweep_dir, overwrite)
    rundir.acquire(sweep_dir)
    atexit.register(rundir.release, sweep_dir)  # Tune runs to the end of this process; a killed one leaves a stale lock
    if not resume:
        if overwrite:
            rundir.clear(sweep_dir)
        rundir.write_marker(sweep_dir, rundir.SWEEP_MARKER)
    if spec.search == "sobol":  # what analysis.sensitivity pairs the design's rows by
        grids = {d.key: list(d.values) for d in spec.dimensions if d.kind == "grid"}
        write_text(json.dumps(record(spec.drawn, spec.num_samples, int(cfg.seed), grids, spec.seeds), indent=1),
                   sweep_dir / DESIGN_FILE)
    # No preloading here: with it, sweep=compare_schemes's first trial started no sooner (14.1 s after launch against
    # 13.7 s), so the idle workers' imports only took CPU from the first trials.
    cpus, gpus = connect(OmegaConf.to_container(cfg.cluster, resolve=True), preload=())
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    _check_trial_cpus(spec, cfg, max((n.get("CPU", 0.0) for n in nodes), default=cpus))
    cache: dict[str, list] = {}

    def resources(config: dict) -> tune.PlacementGroupFactory:
        values = trial_values(spec, config)
        key = repr(sorted(values.items()))
        if key not in cache:
            cache[key] = trial_bundles(spec, trial_config(base, values, spec.variants), cpus, gpus)
            check_fits(cache[key], spec.bundle_strategy, nodes)
        return tune.PlacementGroupFactory(cache[key], strategy=spec.bundle_strategy)

    for values in check_points(spec):  # impossible reservations fail now, not as a Tune trial that never starts
        resources({**values, INDEX: 0})
    need = max(sum(b.get("CPU", 0) for b in bundles) for bundles in cache.values())
    side = int(cpus // need) if need > 0 else spec.trial_count()
    if spec.max_concurrent:
        side = min(side, spec.max_concurrent)
    log.info("sweep %s: %d trial(s), each reserving %g CPU: up to %d at a time on %g CPUs; about %s in all at "
             "sweep.trial_seconds=%g a trial", spec.name, spec.trial_count(), need, max(1, side), cpus,
             duration(math.ceil(spec.trial_count() / max(1, side)) * spec.trial_seconds), spec.trial_seconds)
    trainable = tune.with_resources(make_trainable(spec, base, sweep_dir), resources)
    from sim.sweep.tracked import callbacks, track_sweep  # Tune's logger callbacks: imported with Ray, not before

    tracking = parse_tracking(cfg.get("tracking"))
    tracked = callbacks(tracking, sweep_dir, spec.name, describer(spec, base), resume)  # before any trial starts
    if resume:
        log.info("resuming the sweep in %s", sweep_dir)
        try:
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, restart_errored=True)
        except (ImportError, AttributeError, EOFError, pickle.UnpicklingError) as e:  # Tune's pickle, from elsewhere
            raise ConfigError("resume", f"{sweep_dir}: Tune's saved state cannot be read here ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); run the sweep again "
                              "in another hydra.run.dir") from None
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(spec, int(cfg.seed)), tune_config=_tune_config(spec, cfg),
                           run_config=run_config(spec, sweep_dir, tracked))
    grid = tuner.fit()
    trials, tables = collect(spec, grid, sweep_dir, lambda values: variant_label(values[VARIANT]) if VARIANT in values
                             else load_spec(trial_config(base, values)).scheme_name)
    summary = summarize(spec, trials)
    write_text(OmegaConf.to_yaml(cfg, resolve=True), sweep_dir / "config.yaml")
    for kind, df in tables.items():
        write_table(df, sweep_dir / f"{kind}.parquet")
    write_table(trials, sweep_dir / "trials.parquet")
    write_csv(trials, sweep_dir / "trials.csv")
    write_csv(summary, sweep_dir / "summary.csv")
    if tracking.on:
        folder = track_sweep(tracking, sweep_dir, cfg, summary, render(spec, trials, summary, sweep_dir))
        log.info("tracking: %s", tracking.opening(folder) if folder else "nothing to log")
    return trials, summary


def describer(spec: SweepSpec, base: list[str]):
    """A trial's Tune config -> (its resolved config flattened, its tags), for the tracking callbacks."""

    def describe(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        cfg = trial_config(base, trial_values(spec, config), spec.variants)
        run = load_spec(cfg)
        return flatten(cfg), {"run_id": run.run_id, "scheme": run.scheme_name, "seed": str(run.seed)}

    return describe


def run_config(spec: SweepSpec, sweep_dir: Path, tracked: list = ()):
    """Tune's run config: where its files go, no retries, what the console shows (``sweep.tune_verbose``), and the
    ``tracked`` logger callbacks (sim.sweep.tracked), called before the console's line of a finished trial."""
    from ray import tune

    return tune.RunConfig(storage_path=str(sweep_dir), name=TUNE_DIR, verbose=1 if spec.tune_verbose else 0,
                          callbacks=[*tracked, *([] if spec.tune_verbose else [progress(spec)])],
                          failure_config=tune.FailureConfig(max_failures=0))


def progress(spec: SweepSpec):
    """A Tune callback that prints one line per finished or failed trial (Tune's own tables stay off).

    A resumed sweep keeps the console settings it started with: Tune restores them with its state.
    """
    from ray import tune

    class Progress(tune.Callback):
        def setup(self, **info) -> None:
            self.started = time.time()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.show(trials, trial, None)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            error = trial.get_error()
            self.show(trials, trial, error if error is not None else "failed")

        def show(self, trials, trial, error) -> None:
            # Tune marks a completed trial TERMINATED only after this call, an errored one before it.
            done = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)
            values = trial_values(spec, trial.config) if trial.config else {}
            print(progress_line(spec, values, trial.last_result or {}, done, max(spec.trial_count(), len(trials)),
                                error, time.time() - getattr(self, "started", time.time())), flush=True)

    return Progress()


def check_trust(sweep_dir: Path, trusted: bool) -> None:
    """Resuming unpickles Tune's saved state, which can run code: only a sweep folder this user made here, or sweep_trust=true."""
    marker = rundir.read_marker(sweep_dir, rundir.SWEEP_MARKER)
    if trusted or rundir.made_here(marker):
        return
    whose = (f"it was made by {marker.get('user')} on {marker.get('host')}" if marker else
             f"it has no {rundir.SWEEP_MARKER}, so it was not made by this user's sweeps")
    raise ConfigError("sweep_trust", f"{sweep_dir}: {whose}; resuming unpickles its Tune state, which can run code, "
                      "so pass sweep_trust=true only if you trust the folder")


def _tune_config(spec: SweepSpec, cfg: DictConfig):
    """Search algorithm, scheduler, metric and concurrency for Tune."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator, Repeater

    if spec.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # The sampler is seeded so a sweep proposes the same configurations again; each is run once per seed.
        search = Repeater(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=int(cfg.seed))),
                          repeat=len(spec.seeds), set_index=True)
    else:  # every trial is listed in the param space (random draws included): Tune walks the grid
        search = BasicVariantGenerator()
    scheduler = None
    if spec.scheduler == "asha":
        rounds = load_spec(cfg).rounds  # the base config's rounds (smoke shrinks them)
        scheduler = seedwise(lambda: ASHAScheduler(
            time_attr="round", max_t=rounds, grace_period=min(spec.grace_period, rounds),
            reduction_factor=spec.reduction_factor))
    # In-process trials reuse their processes (torch imported once per process, not once per trial); a trial that
    # starts actors of its own gets a fresh process, so no actor outlives the placement group it was captured in.
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search, scheduler=scheduler,
                           num_samples=spec.samples, max_concurrent_trials=spec.max_concurrent,
                           reuse_actors=spec.backend == "inprocess",
                           trial_dirname_creator=lambda t: t.trial_id, trial_name_creator=lambda t: t.trial_id)


def seedwise(make: Callable[[], Any]):
    """A Tune scheduler running one ``make()`` scheduler per seed, so a trial competes only with its own seed's.

    Seeds draw different data, and one seed's data can be easier for every configuration
    (on the default scenario seed 1 reaches accuracy 1.0 whatever FedProx's mu and lr):
    pooled over seeds, ASHA stopped every trial of the harder seed at its first rung.
    """
    from ray.tune.schedulers import FIFOScheduler

    class Seedwise(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.by_seed: dict[Any, Any] = {}
            self.search: dict[str, Any] = {}

        def set_search_properties(self, metric, mode, **spec) -> bool:
            self.search = dict(metric=metric, mode=mode, **spec)
            return True

        def of(self, trial):
            seed = trial.config.get("seed", trial.config.get(INDEX))  # a grid's seed, or the Repeater's index
            if seed not in self.by_seed:
                self.by_seed[seed] = make()
                self.by_seed[seed].set_search_properties(**self.search)
            return self.by_seed[seed]

        def on_trial_add(self, controller, trial):
            self.of(trial).on_trial_add(controller, trial)

        def on_trial_result(self, controller, trial, result):
            return self.of(trial).on_trial_result(controller, trial, result)

        def on_trial_complete(self, controller, trial, result):
            self.of(trial).on_trial_complete(controller, trial, result)

        def on_trial_remove(self, controller, trial):
            self.of(trial).on_trial_remove(controller, trial)

        def debug_string(self) -> str:
            return "\n".join(f"seed {k}: {s.debug_string()}" for k, s in self.by_seed.items())

    return Seedwise()
