"""Tracking (sim/tracking.py, sim/sweep/tracked.py): what each backend writes, read back with its own reader; no number
moves with tracking on; bad input is one line before anything starts."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from sim.cli import compose, guard
from sim.checks import load_spec
from sim.tracking import Tracking, flatten, key, track_compare, track_run

SMALL = ["smoke=true", "rounds=2", "data.num_samples=600", "engine.backend=inprocess"]
COMPARE = [*SMALL, "schemes=[fedavg]", "seeds=1", "report=false"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """A tiny compare (isolated and fedavg, one seed, two rounds, in process) with tracking off: its run directories."""
    from sim.compare import compare

    out = tmp_path_factory.mktemp("compare") / "cmp"
    table = compare(compose("compare", COMPARE), COMPARE, out)
    (out / "table.txt").write_text(table.to_string())
    return out


def mlflow_runs(folder: Path):
    """(every run of the MLflow file store in ``folder`` by name, the client), read with MLflow's own client."""
    from mlflow.tracking import MlflowClient

    from sim.tracking import allow_file_store

    allow_file_store()
    client = MlflowClient(tracking_uri=folder.as_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_name: r for r in client.search_runs(experiments)}, client


def tensorboard_run(folder: Path):
    """The events of one TensorBoard run folder, read with TensorBoard's own event processing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_mlflow_holds_the_params_every_round_the_summary_and_the_files(compared, tmp_path) -> None:
    # Prepare: one run of the compare, logged as python -m sim logs it, into a chosen store
    run_dir = compared / "runs" / "fedavg"
    tracking = Tracking("mlflow", str(tmp_path / "store"))
    # Execute
    folder = track_run(tracking, run_dir, "the printed summary")
    # Assert: one finished run named by its run id, whose params are the run's resolved config, flattened
    runs, client = mlflow_runs(folder)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    (name, run), = runs.items()
    assert name == metrics["run_id"].iloc[0] and run.info.status == "FINISHED" and run.data.tags["scheme"] == "fedavg"
    config = flatten(OmegaConf.load(run_dir / "config.yaml"))
    assert run.data.params == {key(k): str(v) for k, v in config.items()} and run.data.params["training.lr"] == "0.05"
    # Every metric of every institution in every round, exactly (MLflow keeps float64)
    for (institution, metric), rows in metrics.groupby(["institution", "metric"]):
        history = client.get_metric_history(run.info.run_id, f"{institution}/{metric}")
        assert sorted((m.step, m.value) for m in history) == sorted(zip(rows["round"], rows["value"]))
    final = metrics[(metrics["selected"]) & (metrics["institution"] == "global") & (metrics["metric"] == "accuracy")]
    assert run.data.metrics["final/global/accuracy"] == final["value"].iloc[0]
    assert run.data.metrics["final/megabytes"] > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "summary.txt"}


def test_tensorboard_holds_every_round_the_summary_and_the_config(compared, tmp_path) -> None:
    run_dir = compared / "runs" / "fedavg"
    folder = track_run(Tracking("tensorboard", str(tmp_path / "tb")), run_dir, "the printed summary")
    (logs,) = list(folder.iterdir())  # one TensorBoard run, named by the run id
    events = tensorboard_run(logs)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert logs.name == metrics["run_id"].iloc[0]
    for (institution, metric), rows in metrics.groupby(["institution", "metric"]):
        logged = sorted((e.step, e.value) for e in events.Scalars(f"{institution}/{metric}"))
        assert [s for s, _ in logged] == sorted(rows["round"])
        # TensorBoard stores scalars as float32: equal to float32 rounding (relative 1e-7), no more
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for (_, a), b in
                   zip(logged, rows.sort_values("round")["value"]))
    assert {"ledger/megabytes", "final/global/accuracy"} <= set(events.Tags()["scalars"])
    assert {"config/text_summary", "summary.txt/text_summary"} <= set(events.Tags()["tensors"])
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # the config in the HParams dashboard


def test_a_compare_is_one_run_holding_the_summary_with_one_nested_run_per_scheme_and_seed(compared, tmp_path) -> None:
    cfg = compose("compare", [*COMPARE, "tracking=mlflow"])
    table = pd.read_csv(compared / "summary.csv")
    folder = track_compare(Tracking("mlflow", str(tmp_path / "store")), compared, cfg, table,
                           (compared / "table.txt").read_text(), None)
    runs, client = mlflow_runs(folder)
    parent = runs.pop(f"compare-{compared.name}")
    assert set(runs) == {"isolated", "fedavg"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    assert parent.data.metrics["fedavg/global_accuracy"] == pd.read_csv(compared / "summary.csv").set_index(
        "scheme").loc["fedavg", "global_accuracy"]
    assert {"summary.csv", "summary.txt", "config.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # TensorBoard: the same runs in one folder of the compare's, the summary beside them
    folder = track_compare(Tracking("tensorboard", str(tmp_path / "tb")), compared, cfg,
                           pd.read_csv(compared / "summary.csv"), "table", None)
    assert sorted(p.name for p in (folder / "compare").iterdir()) == ["fedavg", "isolated", "summary"]


def test_tracking_changes_no_number(compared, tmp_path) -> None:
    # Prepare: the compare's fedavg run again, as python -m sim runs it with tracking=tensorboard
    from sim.__main__ import track
    from sim.engine import run

    cfg = compose("config", [*SMALL, "scheme=fedavg", "tracking=tensorboard"])
    # Execute
    result = run(cfg, tmp_path / "run")
    track(cfg, str(tmp_path / "run"), "summary")
    # Assert: the same run id (tracking is not part of what a run is) and the same numbers as with tracking=none
    assert (tmp_path / "run" / "tensorboard").is_dir()
    untracked = pd.read_parquet(compared / "runs" / "fedavg" / "metrics.parquet")
    assert result.run_id == untracked["run_id"].iloc[0]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "metrics.parquet"), untracked)


@pytest.mark.parametrize("overrides, named", [
    (["tracking=wandb"], "tracking: unknown option 'wandb'; choose one of mlflow, none, tensorboard"),
    (["tracking=mlflow", "tracking.backend=wandb"], "tracking.backend: unknown backend 'wandb'"),
    (["tracking=tensorboard", "tracking.dir=/proc/collabsim-logs"],  # /proc takes no new file, even from root
     "tracking.dir: /proc/collabsim-logs is not writable"),
    (["tracking=mlflow", "tracking.dir=FILE/store"], "is a file, not a folder"),
])
def test_bad_tracking_is_one_line_before_anything_starts(overrides, named, tmp_path, capsys) -> None:
    (tmp_path / "FILE").write_text("")
    overrides = [o.replace("FILE", str(tmp_path / "FILE")) for o in overrides]
    with pytest.raises(SystemExit) as exit_:
        guard("config", overrides, load_spec)  # what every command runs before Hydra, Ray or any actor
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    assert not (tmp_path / "FILE").is_dir() and os.listdir(tmp_path) == ["FILE"]


def test_compare_and_sweep_refuse_an_unwritable_tracking_folder_before_starting(capsys) -> None:
    from sim.compare import check as compare_check
    from sim.sweep import check

    bad = ["tracking=mlflow", "tracking.dir=/proc/collabsim-store"]
    for name, checker in (("compare", compare_check), ("sweep_main", check)):
        with pytest.raises(SystemExit):
            guard(name, bad, checker, with_overrides=True)
        assert "tracking.dir: /proc/collabsim-store is not writable" in capsys.readouterr().err


def test_sweep_trials_go_through_tunes_logger_callbacks(tmp_path) -> None:
    # Prepare: the callbacks a sweep hands Tune, driven as Tune drives them for one trial of two rounds
    from ray.tune.experiment import Trial

    from sim.sweep import describer
    from sim.sweep.space import load_sweep
    from sim.sweep.tracked import callbacks, track_sweep

    cfg = compose("sweep_main", [*SMALL, "tracking=mlflow"])
    spec = load_sweep(OmegaConf.to_container(cfg.sweep, resolve=True), smoke=True)
    for backend in ("mlflow", "tensorboard"):
        sweep_dir = tmp_path / backend
        sweep_dir.mkdir()
        tracking = Tracking(backend)
        (callback,) = callbacks(tracking, sweep_dir, spec.name, describer(spec, SMALL), resume=False)
        trial = Trial("sweep", config={"scheme": "fedavg", "seed": 0}, trial_id="t_00000", stub=True)
        # Execute
        callback.setup()
        callback.log_trial_start(trial)
        for r, acc in ((1, 0.5), (2, 0.75)):
            callback.log_trial_result(r, trial, {"global_accuracy": acc, "round": r, "training_iteration": r})
        callback.log_trial_end(trial)
        pd.DataFrame({"scheme": ["fedavg"], "global_accuracy": [0.75]}).to_csv(sweep_dir / "summary.csv", index=False)
        track_sweep(tracking, sweep_dir, cfg, pd.read_csv(sweep_dir / "summary.csv"), "table")
        # Assert: a trial's params are its resolved config, its rounds are steps; the sweep's run holds the summary
        if backend == "mlflow":
            runs, client = mlflow_runs(sweep_dir / "mlruns")
            sweep_run = runs.pop(f"sweep-{spec.name}")
            (trial_run,) = runs.values()
            assert trial_run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
            assert trial_run.data.tags["scheme"] == "fedavg" and trial_run.data.params["training.lr"] == "0.05"
            history = client.get_metric_history(trial_run.info.run_id, "global_accuracy")
            assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75)]
            assert sweep_run.data.metrics["fedavg/global_accuracy"] == 0.75
            assert "summary.csv" in {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
        else:
            group = sweep_dir / "tensorboard" / f"sweep-{spec.name}"
            (trial_logs,) = [p for p in group.iterdir() if p.name != "summary"]
            assert trial_logs.name.startswith("t_00000-fedavg-")
            events = tensorboard_run(trial_logs)
            assert [(e.step, e.value) for e in events.Scalars("ray/tune/global_accuracy")] == [(1, 0.5), (2, 0.75)]
            assert "config/text_summary" in events.Tags()["tensors"]
            assert "fedavg/global_accuracy" in tensorboard_run(group / "summary").Tags()["scalars"]
