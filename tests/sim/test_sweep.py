"""Sweeps: the Hydra-to-Tune translation, what each trial reserves, the results table, resume, bad sweep files.

The end-to-end runs are subprocesses on tiny budgets; one sweep is interrupted (its
process group killed) and resumed, and several tests read what it left behind (its trials
tracked in MLflow through Tune's callback, across the interruption).
"""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from sim.cli import compose, guard
from sim.core.results import SCHEMAS, frame
from sim.sweep.space import INDEX, check_points, grid_points, load_sweep, override_value, param_space, trial_values
from sim.sweep import check_fits, trial_bundles, trial_config
from sim.sweep.results import gains, summarize
from sim.core.types import ConfigError

TINY = ["smoke=true", "rounds=2", "data.num_samples=600", "cluster.num_cpus=2"]
ONE_HOST = ["placement=pooled", "engine.pooled_hosts=1"]  # two actors per run (coordinator, one host): quick to start


def sweep_of(**fields):
    """A sweep spec from the defaults in conf/sweep_main.yaml plus ``fields``."""
    base = compose("sweep_main", ["sweep=compare_schemes"]).sweep
    return load_sweep({**base, **fields})


# ---- search space: Hydra to Tune -----------------------------------------------------------------

KINDS = {"scheme": {"grid": ["fedavg", "fedprox"]}, "training.local_epochs": {"choice": [1, 2]},
         "training.lr": {"uniform": [0.01, 0.1]}, "scheme.server_lr": {"loguniform": [0.1, 1.0]},
         "training.batch_size": {"randint": [16, 18]}}


def test_grid_search_lists_every_value_and_every_seed():
    spec = sweep_of(space={"scheme": {"grid": ["fedavg", "fedprox"]}, "training.lr": [0.01, 0.1]})
    assert param_space(spec) == {"scheme": {"grid_search": ["fedavg", "fedprox"]},
                                 "training.lr": {"grid_search": [0.01, 0.1]}, "seed": {"grid_search": [0, 1, 2]}}
    assert spec.samples == 1 and spec.trial_count() == 2 * 2 * 3


def test_random_search_draws_each_configuration_once_for_all_seeds():
    spec = sweep_of(search="random", num_samples=50, space=KINDS)
    space = param_space(spec, seed=7)
    assert space["scheme"] == {"grid_search": ["fedavg", "fedprox"]} and space["seed"] == {"grid_search": [0, 1, 2]}
    drawn = pd.DataFrame(space["sample"]["grid_search"])  # 50 draws, each run on every seed (a grid, not resampled)
    assert len(drawn) == 50 and spec.trial_count() == 2 * 50 * 3
    assert set(drawn["training.local_epochs"]) == {1, 2}
    assert drawn["training.lr"].between(0.01, 0.1).all() and drawn["scheme.server_lr"].between(0.1, 1.0).all()
    assert set(drawn["training.batch_size"]) == {16, 17, 18}  # randint includes both bounds
    assert param_space(spec, seed=7)["sample"] == space["sample"] != param_space(spec, seed=8)["sample"]
    trial = {"scheme": "fedavg", "sample": drawn.iloc[3].to_dict(), "seed": 2}
    assert trial_values(spec, trial) == {"scheme": "fedavg", **drawn.iloc[3].to_dict(), "seed": 2}


def test_a_model_based_search_gets_tune_domains_and_leaves_seeds_to_the_repeater():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    spec = sweep_of(search="optuna", num_samples=4, space=KINDS)
    space = param_space(spec)
    assert "seed" not in space and isinstance(space["scheme"], Categorical)  # Optuna takes no grids
    assert space["scheme"].categories == ["fedavg", "fedprox"] and space["training.local_epochs"].categories == [1, 2]
    assert isinstance(space["training.lr"], Float) and (space["training.lr"].lower, space["training.lr"].upper) == (0.01, 0.1)
    assert isinstance(space["scheme.server_lr"].get_sampler(), LogUniform)
    # randint bounds are both included, as the file reads; Tune's upper bound is exclusive, hence 19.
    assert isinstance(space["training.batch_size"], Integer) and space["training.batch_size"].upper == 19
    assert spec.samples == 12 and spec.trial_count() == 12  # 4 configurations x 3 seeds
    assert [trial_values(spec, {**dict.fromkeys(KINDS, 1), INDEX: i})["seed"] for i in range(3)] == [0, 1, 2]


def test_nested_groups_and_bare_lists_read_as_dotted_keys_and_grids():
    spec = sweep_of(space={"scheme": ["fedavg", "fedprox"], "training": {"lr": {"grid": [0.01, 0.1]}}})
    assert [(d.key, d.kind, d.values) for d in spec.dimensions] == [
        ("scheme", "grid", ("fedavg", "fedprox")), ("training.lr", "grid", (0.01, 0.1))]
    assert len(grid_points(spec)) == spec.trial_count() == 2 * 2 * 3


def test_smoke_keeps_two_values_two_seeds_and_two_samples():
    cfg = compose("sweep_main", ["sweep=heterogeneity"]).sweep
    full, smoke = load_sweep(cfg), load_sweep(cfg, smoke=True)
    assert full.trial_count() == 27 and smoke.trial_count() == 2 * 2 * 2
    assert load_sweep(compose("sweep_main", ["sweep=fedprox_mu"]).sweep, smoke=True).trial_count() == 4


@pytest.mark.parametrize("value", [0.1, 1e-05, 3, True, None, "fedavg", "a b", [1, 2]])
def test_override_values_survive_hydra(value):
    cfg = compose("config", [f"+probe={override_value(value)}"])
    assert cfg.probe == value


def test_a_trial_config_carries_its_values_over_the_base():
    base = ["scheme=fedavg", "training.lr=0.5", "data=digits"]
    cfg = trial_config(base, {"scheme": "fedprox", "scheme.mu": 1e-05, "training.lr": 0.0123, "seed": 2})
    assert cfg.scheme.mu == 1e-05 and cfg.training.lr == 0.0123 and cfg.seed == 2 and cfg.data.name == "digits"


def test_check_points_use_every_listed_value_and_both_ends_of_ranges():
    spec = sweep_of(search="random", space={"scheme": {"grid": ["fedavg", "fedprox", "fedsgd"]},
                                            "training.lr": {"uniform": [0.01, 0.1]}})
    points = list(check_points(spec))
    assert {p["scheme"] for p in points} == {"fedavg", "fedprox", "fedsgd"}
    assert {p["training.lr"] for p in points} == {0.01, 0.1} and len(points) == 4


# ---- resources ----------------------------------------------------------------------------------

def test_a_trial_reserves_its_own_bundle_then_the_coordinator_and_one_bundle_per_host():
    cfg = compose("config", ["placement=dedicated"])
    spec = sweep_of(bundles="per_host", trial_cpus=None, driver_cpus=0.05, backend="ray")
    bundles = trial_bundles(spec, cfg, 8.0, 0.0)
    institutions = [i.cpus for i in cfg_institutions(cfg)]
    assert bundles[0] == {"CPU": 0.05}  # the trial's own process
    assert bundles[1] == {"CPU": cfg.engine.coordinator_cpus}
    assert [b["CPU"] for b in bundles[2:]] == institutions  # one bundle per dedicated host, in scenario order


def test_merged_bundles_add_up_to_the_same_reservation_within_the_trial_budget():
    cfg = compose("config", [])
    spec = sweep_of(bundles="merged", trial_cpus=1.0, driver_cpus=0.05, backend="ray")
    bundles = trial_bundles(spec, cfg, 2.0, 0.0)
    # 1.55 CPUs of dedicated requests do not fit a 1-CPU trial: pooled hosts share what is left.
    assert len(bundles) == 2 and bundles[0] == {"CPU": 0.05}
    assert math.isclose(sum(b["CPU"] for b in bundles), 1.0)


def test_an_in_process_trial_reserves_the_one_core_its_process_uses():
    spec = sweep_of(trial_cpus=1.0)
    assert spec.backend == "inprocess"
    assert trial_bundles(spec, compose("config", []), 2.0, 0.0) == [{"CPU": 1.0}]


def test_a_trial_no_node_can_hold_is_refused():
    with pytest.raises(ConfigError, match="sweep.trial_cpus: a trial reserves 3 CPUs"):
        check_fits([{"CPU": 1.0}, {"CPU": 2.0}], "STRICT_PACK", [{"CPU": 2.0}, {"CPU": 2.0}])
    check_fits([{"CPU": 1.0}, {"CPU": 2.0}], "PACK", [{"CPU": 2.0}, {"CPU": 2.0}])  # bundles may go to two nodes


def test_a_trial_reservation_larger_than_the_local_cluster_is_refused_before_ray():
    from sim.sweep import check

    # Execute / Assert: 100 CPUs a trial on a 4-CPU local cluster (an in-process trial would silently use one)
    with pytest.raises(ConfigError) as err:
        check(compose("sweep_main", ["sweep.trial_cpus=100", "cluster.num_cpus=4"]), [])
    assert str(err.value) == ("sweep.trial_cpus: 100 is more than the 4 CPUs of the cluster; lower it (at most 4), "
                              "or null to let a trial take the whole cluster")


def test_a_sweep_of_more_trials_than_max_trials_is_refused_with_an_estimate_until_raised():
    # Prepare: 10,000 learning rates x 3 seeds
    space = {"training.lr": {"grid": [i / 10_000 for i in range(1, 10_001)]}}
    # Execute / Assert: refused, naming the count, the time it would take and the flag that runs it
    with pytest.raises(ConfigError) as err:
        sweep_of(space=space, seeds=[0, 1, 2])
    assert str(err.value) == ("sweep.max_trials: the sweep has 30,000 trials, more than sweep.max_trials=1,000: about "
                              "20.8 days of trial time at sweep.trial_seconds=60 each; shrink sweep.space or seeds, or "
                              "pass sweep.max_trials=30000 to run them all")
    assert sweep_of(space=space, seeds=[0, 1, 2], max_trials=30_000).trial_count() == 30_000


def test_a_run_inside_a_placement_group_is_laid_out_on_that_reservation(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from agents.runtime.cluster import connect

    ray = ray_cluster
    pg = placement_group([{"CPU": 0.1}, {"CPU": 0.25}, {"CPU": 0.7}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        inside = ray.remote(lambda: connect({})).options(num_cpus=0.1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
        cpus, gpus = ray.get(inside.remote(), timeout=120)
    finally:
        remove_placement_group(pg)
    assert math.isclose(cpus, 0.95) and gpus == 0.0  # the group's bundles less the task's own 0.1 CPU


def cfg_institutions(cfg):
    from sim.checks import load_spec

    return load_spec(cfg).scenario.institutions


# ---- early stopping ------------------------------------------------------------------------------

def test_asha_compares_a_trial_only_with_trials_of_its_own_seed():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from sim.sweep import seedwise

    def asha():
        return ASHAScheduler(time_attr="round", max_t=4, grace_period=1, reduction_factor=2)

    easy = [SimpleNamespace(trial_id=f"easy{i}", config={"seed": 1}) for i in range(2)]
    hard = SimpleNamespace(trial_id="hard", config={"seed": 0})
    decisions = {}
    for name, scheduler in [("seedwise", seedwise(asha)), ("pooled", asha())]:
        scheduler.set_search_properties("global_accuracy", "max")
        for trial in [*easy, hard]:
            scheduler.on_trial_add(None, trial)
        for trial in easy:  # seed 1's data is easy: every configuration reaches 1.0
            scheduler.on_trial_result(None, trial, {"round": 1, "global_accuracy": 1.0})
        decisions[name] = scheduler.on_trial_result(None, hard, {"round": 1, "global_accuracy": 0.6})
    # Pooled, the seed-0 trial is stopped for its seed, not its settings; within seed 0 it is the first at the rung.
    assert decisions == {"seedwise": TrialScheduler.CONTINUE, "pooled": TrialScheduler.STOP}


# ---- the results table --------------------------------------------------------------------------

def metrics_of(run_id, scheme, seed, accuracy):
    """A finished run's metrics: final accuracy per institution."""
    return frame("metrics", [{"run_id": run_id, "scheme": scheme, "scenario": "default", "seed": seed, "round": 2,
                              "institution": name, "discipline": "d", "metric": "accuracy", "value": acc}
                             for name, acc in accuracy.items()])


def test_gain_is_measured_against_the_isolated_trial_with_the_same_other_values():
    spec = sweep_of(space={"scheme": ["isolated", "fedavg"], "data.dirichlet_alpha": [0.1, 1.0]}, seeds=[0])
    runs = [("i1", "isolated", 0.1, {"a": 0.5, "b": 0.5}), ("f1", "fedavg", 0.1, {"a": 0.6, "b": 0.4}),
            ("i2", "isolated", 1.0, {"a": 0.8, "b": 0.8}), ("f2", "fedavg", 1.0, {"a": 0.9, "b": 0.9})]
    trials = pd.DataFrame([{"trial_id": f"t{i}", "scheme": s, "data.dirichlet_alpha": alpha, "seed": 0, "run_id": r}
                           for i, (r, s, alpha, _) in enumerate(runs)])
    out = gains(spec, trials, [metrics_of(r, s, 0, acc) for r, s, _, acc in runs]).set_index("trial_id")
    # Prepare/Execute done; Assert: fedavg at alpha 0.1 gains (+10 - 10)/2 = 0 points, one institution worse off;
    # at alpha 1.0, +10 points each against the alpha-1.0 isolated run (not the alpha-0.1 one).
    assert out.loc["t1", "mean_gain"] == pytest.approx(0.0, abs=1e-9) and out.loc["t1", "worse_off"] == 1
    assert out.loc["t3", "mean_gain"] == pytest.approx(10.0) and out.loc["t3", "worse_off"] == 0
    assert out.loc["t0", "mean_gain"] == 0.0 and out.loc["t2", "mean_gain"] == 0.0


def test_summary_gives_mean_and_interval_over_seeds_per_configuration():
    spec = sweep_of(space={"scheme": ["isolated", "fedavg"]}, seeds=[0, 1, 2])
    trials = pd.DataFrame([{"trial_id": f"{s}{seed}", "status": "complete", "scheme": s, "seed": seed,
                            "global_accuracy": acc, "mean_gain": gain}
                           for s, accs, gain in [("isolated", [0.5, 0.6, 0.7], 0.0), ("fedavg", [0.8, 0.8, 0.8], 5.0)]
                           for seed, acc in enumerate(accs)]
                          + [{"trial_id": "stopped", "status": "stopped", "scheme": "fedavg", "seed": 3,
                              "global_accuracy": 0.1, "mean_gain": -40.0}])
    table = summarize(spec, trials).set_index("scheme")
    assert list(table.index) == ["isolated", "fedavg"] and table.loc["fedavg", "seeds"] == 3  # the stopped trial is left out
    # t(0.975, 2) * sd 0.1 / sqrt(3) = 4.303 * 0.0577 = 0.248
    assert table.loc["isolated", "global_accuracy"] == pytest.approx(0.6)
    assert table.loc["isolated", "global_accuracy_high"] - 0.6 == pytest.approx(0.2484, abs=1e-3)
    assert table.loc["fedavg", "global_accuracy_low"] == pytest.approx(0.8)


def test_the_best_configurations_are_those_that_ran_on_every_seed_then_by_the_metric():
    from sim.sweep.results import best

    spec = sweep_of(space={"scheme": ["fedavg", "fedprox", "fedsgd"]}, seeds=[0, 1])
    summary = pd.DataFrame({"scheme": ["fedavg", "fedprox", "fedsgd"], "seeds": [1, 2, 2],
                            "global_accuracy": [1.0, 0.8, 0.9]})  # fedavg was stopped early on its hard seed
    assert list(best(spec, summary)["scheme"]) == ["fedsgd", "fedprox", "fedavg"]


# ---- bad sweep files ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, named", [
    (["~sweep.space"], "sweep.space: empty"),
    (["+sweep.space.scheme_typo={grid:[1,2]}"], "sweep.space.scheme_typo: unknown config key"),
    (["sweep=fedprox_mu", "+sweep.space.scheme.muu={grid:[0.1]}"], "sweep.space.scheme.muu: unknown config key"),
    (["sweep.space.scheme={grid:[fedavg,fedxx]}"], "sweep.space.scheme: unknown option 'fedxx'"),
    (["+sweep.space.training.lr={normal:[0,1]}"], "sweep.space.training.lr: unknown search-space kind 'normal'"),
    (["sweep=fedprox_mu", "sweep.search=grid"], "sweep.space.scheme.mu: loguniform needs search=random or optuna"),
    (["sweep.search=hyperopt"], "sweep.search: unknown search 'hyperopt'; choose one of grid, random, optuna"),
    (["sweep.scheduler=hyperband"], "sweep.scheduler: unknown scheduler"),
    (["sweep.metric=accuracy"], "sweep.metric: unknown metric 'accuracy'"),
    (["sweep.seeds=[]"], "sweep.seeds"),
    (["+sweep.bogus=1"], "sweep.bogus: unknown key"),
    (["sweep.overrides=['training.lrr=0.1']"], "sweep.overrides: training.lrr: unknown config key; did you mean training.lr?"),
    (["sweep=fedprox_mu", "sweep.search=random", "+sweep.space.training.local_epochs={randint:[0,3]}"],
     "sweep.space.training.local_epochs: expected a whole number >= 1"),
    (["sweep.space.scheme={grid:[isolated,fedavg]}", "+sweep.space.scheme.mu={grid:[0.1]}"], "sweep.space.scheme"),
    (["resume=maybe"], "resume: expected true or false"),
])
def test_a_bad_sweep_fails_with_one_line_naming_the_key(overrides, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        guard("sweep_main", overrides, lambda cfg: _check_with(cfg, overrides))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert named in err


def _check_with(cfg, overrides):
    from sim.sweep import check

    check(cfg, overrides)


def test_per_host_bundles_wait_for_an_engine_that_pins_actors_to_them(capsys):
    from agents.runtime.backend import RayBackend

    if getattr(RayBackend, "pins_bundles", False):
        pytest.skip("the engine pins each actor to its bundle: per_host is allowed")
    # Actors that take any bundle with room can fill unequal bundles in the wrong order and strand the largest.
    with pytest.raises(SystemExit):
        guard("sweep_main", ["sweep.bundles=per_host"], lambda cfg: _check_with(cfg, []))
    assert "sweep.bundles: per_host needs an engine" in capsys.readouterr().err


def test_shipped_sweeps_pass_the_check():
    for name in ("compare_schemes", "fedprox_mu", "heterogeneity"):
        guard("sweep_main", [f"sweep={name}"], lambda cfg: _check_with(cfg, [f"sweep={name}"]))


@pytest.mark.slow
def test_the_command_refuses_a_bad_sweep_before_ray_starts(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "sim.sweep", "~sweep.space", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "sweep.space: empty" in proc.stderr
    assert not out.exists()  # Hydra never made the sweep directory: nothing ran


# ---- end to end: an interrupted sweep, resumed --------------------------------------------------

@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """compare_schemes shrunk to 2 schemes x 2 seeds, two trials at a time on 2 CPUs; the driver's whole process
    group is killed once two trials have finished and the console has said so, then ``resume=true`` finishes the sweep.

    (A trial's tables are written before Tune's callback prints its line: waiting for the tables alone raced the line.)"""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    args = [sys.executable, "-m", "sim.sweep", "sweep=compare_schemes", *TINY, "tracking=mlflow",
            f"hydra.run.dir={out}"]
    log = out.parent / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and (len(finished(out)) < 2 or printed(log) < 2):
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the group this test started: the driver and the Ray it started
        first.wait()
    before = {d.name: (d / "metrics.parquet").stat().st_mtime_ns for d in finished(out)}
    assert len(before) >= 2, log.read_text()[-3000:]
    proc = subprocess.run(args + ["resume=true"], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(dir=out, before=before, proc=proc, first=log.read_text(),
                           trials=pd.read_parquet(out / "trials.parquet"))


def printed(log: Path) -> int:
    """How many trial lines the sweep has printed so far."""
    return sum(ln.startswith("trial ") for ln in _read(log).splitlines())


def finished(sweep_dir: Path) -> list[Path]:
    """Trial run directories whose run completed."""
    return [d for d in sorted((sweep_dir / "trials").glob("*")) if '"complete"' in _read(d / "status.json")]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_resume_finishes_the_sweep_without_rerunning_finished_trials(resumed):
    assert len(resumed.trials) == 4 and set(resumed.trials["status"]) == {"complete"}
    assert set(resumed.before) <= set(resumed.trials["trial_id"])
    for trial_id, mtime in resumed.before.items():  # a rerun would have rewritten the tables
        assert (resumed.dir / "trials" / trial_id / "metrics.parquet").stat().st_mtime_ns == mtime


def test_resume_needs_a_sweep_to_resume(tmp_path):
    from sim.sweep import sweep

    with pytest.raises(ConfigError, match="resume: no sweep to resume in"):
        sweep(compose("sweep_main", ["resume=true", *TINY]), ["resume=true"], tmp_path)


@pytest.mark.slow
def test_a_directory_holding_a_sweep_is_not_overwritten(resumed):
    from sim.sweep import sweep

    with pytest.raises(ConfigError, match="already holds a sweep; add resume=true"):
        sweep(compose("sweep_main", TINY), [], resumed.dir)


@pytest.mark.slow
def test_the_sweep_prints_one_line_per_trial_and_no_tune_tables(resumed):
    # Both the interrupted run and the resumed one print a line per finished trial, never Tune's status tables;
    # with 2 seeds per configuration the summary gives no interval and says so once.
    first = [ln for ln in resumed.first.splitlines() if ln.startswith("trial ")]
    rest = [ln for ln in resumed.proc.stdout.splitlines() if ln.startswith("trial ")]
    assert len(first) >= 2 and rest, resumed.first[-2000:]
    assert all(" finished: " in ln and ln.split("/")[1].startswith("4 ") for ln in first + rest)
    assert {ln.split("seed=")[1].split()[0] for ln in first + rest} <= {"0", "1"}
    assert "Trial status" not in resumed.first + resumed.proc.stdout + resumed.proc.stderr
    assert resumed.proc.stdout.count("too few seeds") == 1


@pytest.mark.slow
def test_two_trials_hold_both_cpus_at_once(resumed):
    # In-process trials (the default sweep.backend) reserve one CPU each: two run at once on 2 CPUs. (Once their
    # processes are warm a trial of 2 smoke rounds lasts well under a second, so their time windows need not overlap;
    # trials that start actors of their own are checked against their placement groups in
    # test_a_run_inside_a_placement_group_is_laid_out_on_that_reservation.)
    assert "each reserving 1 CPU: up to 2 at a time on 2 CPUs" in resumed.first, resumed.first[-2000:]


@pytest.mark.slow
def test_the_trials_table_has_values_final_metrics_and_gain(resumed):
    t = resumed.trials
    assert list(t.columns[:13]) == ["trial_id", "status", "scheme", "seed", "rounds", "global_accuracy", "global_loss",
                                    "mean_accuracy", "worst_accuracy", "mean_gain", "worse_off", "started", "finished"]
    assert t["trial_id"].is_unique and sorted(zip(t["scheme"], t["seed"])) == [
        ("isolated", 0), ("isolated", 1), ("pooled", 0), ("pooled", 1)]
    assert (t["rounds"] == 2).all()
    assert (t.loc[t["scheme"] == "isolated", "mean_gain"] == 0).all() and t.loc[t["scheme"] == "pooled", "mean_gain"].notna().all()
    assert len(pd.read_csv(resumed.dir / "trials.csv")) == 4
    out = resumed.proc.stdout
    assert "sweep compare_schemes: 4 trials, 4 complete" in out and "best by global_accuracy (max):" in out
    summary = pd.read_csv(resumed.dir / "summary.csv")
    assert list(summary["scheme"]) == ["isolated", "pooled"] and (summary["seeds"] == 2).all()


@pytest.mark.slow
def test_every_trial_of_the_interrupted_sweep_is_a_finished_mlflow_run_under_the_sweeps_run(resumed):
    from mlflow.tracking import MlflowClient

    from sim.tracking import allow_file_store

    # Prepare: the sweep's default store, read with MLflow's own client
    allow_file_store()
    client = MlflowClient(tracking_uri=(resumed.dir / "mlruns").as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (sweep_run,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    # Assert: every trial finished under the sweep's run (Tune restored the callback), with every round Tune was told
    # of; an attempt the kill cut short stays RUNNING, and a trial that finished before the kill but after Tune last
    # saved its state is replayed from its tables, so it finishes twice, with the same numbers
    done = [r for r in runs if r.data.tags.get("kind") == "trial" and r.info.status == "FINISHED"]
    assert {r.data.tags["trial_name"] for r in done} == set(resumed.trials["trial_id"])
    assert {r.data.tags["mlflow.parentRunId"] for r in done} == {sweep_run.info.run_id}
    for r in done:
        metrics = pd.read_parquet(resumed.dir / "trials" / r.data.tags["trial_name"] / "metrics.parquet")
        ran = metrics[(metrics["institution"] == "global") & (metrics["metric"] == "accuracy") & (metrics["round"] > 0)]
        history = client.get_metric_history(r.info.run_id, "global_accuracy")
        assert sorted((m.step, m.value) for m in history) == sorted(zip(ran["round"], ran["value"]))
    assert {"summary.csv", "trials.csv"} <= {a.path for a in client.list_artifacts(sweep_run.info.run_id)}


@pytest.mark.slow
def test_analysis_reads_a_sweep_directory_like_a_run(resumed):
    from analysis.runs import load_results

    results = load_results([resumed.dir])
    assert results.metrics["run_id"].nunique() == 4 and results.ledger["run_id"].nunique() == 4
    for kind in ("metrics", "ledger", "institutions"):
        assert list(getattr(results, kind).columns) == list(SCHEMAS[kind])


@pytest.mark.slow
def test_the_python_api_loads_a_sweep_directory(resumed):
    from matplotlib.figure import Figure

    from sim import api

    found = api.load(resumed.dir)
    assert isinstance(found, api.SweepResult)
    pd.testing.assert_frame_equal(found.trials, resumed.trials)
    assert list(found.summary["scheme"]) == ["isolated", "pooled"] and found.metrics["run_id"].nunique() == 4
    assert isinstance(found.plot_rounds(), Figure)


@pytest.mark.parametrize("name, argv", [
    ("nosuch", ["sweep=nosuch"]),                                                   # no such sweep file
    ({"space": {"scheme": {"grid": ["fedavg", "fedxx"]}}}, None),                   # a bad value in a sweep of one's own
])
def test_the_python_api_refuses_a_bad_sweep_with_the_commands_line(name, argv, tmp_path, capsys):
    from sim import api

    with pytest.raises(api.ConfigError) as err:
        api.sweep(name, out=tmp_path / "sweep", smoke=True)
    if argv is not None:  # the command's line, word for word
        with pytest.raises(SystemExit):
            guard("sweep_main", argv, _check_with, with_overrides=True)
        assert str(err.value) == capsys.readouterr().err.strip().removeprefix("error: ")
    else:
        assert str(err.value).startswith("sweep.space.scheme: unknown option 'fedxx'"), str(err.value)
    assert not (tmp_path / "sweep").exists()  # refused before Ray started or anything was written


# ---- Hydra multirun ------------------------------------------------------------------------------

@pytest.mark.slow
def test_hydra_multirun_directories_read_together(tmp_path):
    from analysis.runs import load_results
    from sim.core.results import read_table

    out = tmp_path / "multi"
    proc = subprocess.run([sys.executable, "-m", "sim", "-m", "scheme=fedavg,fedprox", "seed=0", *TINY, *ONE_HOST,
                           f"hydra.sweep.dir={out}"], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in out.iterdir() if (p / "metrics.parquet").exists())
    assert [p.name for p in runs] == ["0", "1"]
    assert set(read_table("metrics", runs)["scheme"]) == {"fedavg", "fedprox"}
    assert set(load_results([out]).metrics["scheme"]) == {"fedavg", "fedprox"}


def test_variants_name_override_lists_and_cross_a_key_only_one_scheme_has():
    from sim.sweep.space import expand_variants, trial_overrides, variant_label

    # Prepare
    cfg = {"variants": {"fedavg": ["scheme=fedavg"],
                        "dp": {"overrides": ["scheme=dp_fedavg"], "grid": {"scheme.target_epsilon": [1.0, 8.0]}}},
           "space": {"training.lr": {"grid": [0.1, 0.2]}}, "seeds": [0]}
    # Execute
    spec = load_sweep(cfg)
    # Assert: one variant value per grid entry, crossed with the rest of the space; a value stands for its overrides
    assert spec.keys == ("variant", "training.lr") and spec.trial_count() == 6
    assert spec.dimensions[0].values == ("fedavg", "dp[scheme.target_epsilon=1.0]", "dp[scheme.target_epsilon=8.0]")
    assert trial_overrides({"variant": "dp[scheme.target_epsilon=8.0]", "training.lr": 0.1}, spec.variants) == [
        "scheme=dp_fedavg", "scheme.target_epsilon=8.0", "training.lr=0.1"]
    assert variant_label("dp[scheme.target_epsilon=8.0]") == "dp"
    assert expand_variants(None) == {}


@pytest.mark.parametrize("variants, space, key", [
    ({"a b": ["scheme=fedavg"]}, None, "sweep.variants.a b"),
    ({"a": []}, None, "sweep.variants.a"),
    ({"a": ["fedavg"]}, None, "sweep.variants.a"),
    ({"a": {"overrides": ["scheme=fedavg"], "grid": {"scheme.mu": {"uniform": [0, 1]}}}}, None, "sweep.variants.a.grid"),
    ({"a": {"overrides": ["scheme=fedavg"], "sample": 1}}, None, "sweep.variants.a.sample"),
    ({"a": ["scheme=fedavg"]}, {"variant": {"grid": ["b"]}}, "sweep.space.variant"),
    (None, {"variant": {"grid": ["b"]}}, "sweep.space.variant"),
])
def test_bad_variants_are_refused_naming_the_key(variants, space, key):
    cfg = {"seeds": [0], "space": space or {}, **({"variants": variants} if variants is not None else {})}
    with pytest.raises(ConfigError) as err:
        load_sweep(cfg)
    assert err.value.key == key, str(err.value)


def test_tune_state_saved_before_the_sweep_modules_moved_still_reads():
    import pickle

    from sim.sweep.results import summarize
    from sim.sweep.space import load_sweep

    # Prepare: pickles naming the modules' old paths, as a sweep started before sim/sweep/ saved them
    old = [pickle.dumps(f, protocol=0).replace(b"sim.sweep.space", b"sim.search_space")
           .replace(b"sim.sweep.results", b"sim.sweep_results") for f in (load_sweep, summarize)]
    assert b"sim.search_space" in old[0] and b"sim.sweep_results" in old[1]
    # Execute / Assert
    assert [pickle.loads(b) for b in old] == [load_sweep, summarize]
