"""Checkpoints and resume: a run stopped after any round and resumed gives the very same metrics.parquet."""

import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from sim.core import checkpoint
from sim.core.checkpoint import resume_overrides
from sim.cli import compose
from sim.engine import run
from sim.core.types import ConfigError
from stopping import Stop, stop_after

FLAKY = ["scenario.availability=0.8", "scenario.failure_rate=0.2"]  # faults are part of what must resume exactly


def status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture
def reference(small_cfg, tmp_path_factory):
    """An uninterrupted run directory per scheme (three rounds, a checkpoint every round, flaky institutions)."""
    made = {}

    def make(scheme):
        if scheme not in made:
            made[scheme] = tmp_path_factory.mktemp(f"ref-{scheme}")
            run(small_cfg("rounds=3", "checkpoint_every=1", f"scheme={scheme}", *FLAKY), made[scheme], backend="inprocess")
        return made[scheme]

    return make


# isolated: personal models persist; pooled: the scheme's data pool persists; fedavg: only the global model.
@pytest.mark.parametrize("scheme", ["isolated", "pooled", "fedavg"])
@pytest.mark.parametrize("stop", [1, 2])
def test_a_run_resumed_after_any_round_matches_an_uninterrupted_one(scheme, stop, small_cfg, reference, tmp_path):
    # Prepare: the run stops after round `stop`
    cfg = small_cfg("rounds=3", "checkpoint_every=1", f"scheme={scheme}", *FLAKY)
    with pytest.raises(Stop):
        run(cfg, tmp_path, backend="inprocess", on_round=stop_after(stop))
    assert status(tmp_path)["state"] == "failed" and status(tmp_path)["rounds_done"] == stop
    assert not (tmp_path / "metrics.parquet").exists()  # no table until the run is complete
    # Execute
    run(compose("config", [f"resume={tmp_path}"]), backend="inprocess")
    # Assert: byte-for-byte the same values, every row; the directory now says complete
    ref = reference(scheme)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "metrics.parquet"), pd.read_parquet(ref / "metrics.parquet"))
    resumed, full = (pd.read_parquet(d / "ledger.parquet").drop(columns="compute_seconds") for d in (tmp_path, ref))
    pd.testing.assert_frame_equal(resumed, full)  # compute_seconds is measured wall time, the rest is deterministic
    assert status(tmp_path)["state"] == "complete" and not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_of_an_older_collabsim_with_parquet_rows_still_resumes(small_cfg, reference, tmp_path):
    # Prepare: a stopped run whose row segments are Parquet files, as checkpoints were written before Arrow files
    cfg = small_cfg("rounds=3", "checkpoint_every=1", "scheme=fedavg", *FLAKY)
    with pytest.raises(Stop):
        run(cfg, tmp_path, backend="inprocess", on_round=stop_after(2))
    for arrow in (tmp_path / "checkpoints").glob("rows-*/*.arrow"):
        checkpoint._read_rows(arrow.parent, arrow.stem).to_parquet(arrow.with_suffix(".parquet"), index=False)
        arrow.unlink()
    # Execute
    run(compose("config", [f"resume={tmp_path}"]), backend="inprocess")
    # Assert
    assert pd.read_parquet(tmp_path / "metrics.parquet").equals(pd.read_parquet(reference("fedavg") / "metrics.parquet"))


def test_metric_rows_kept_as_arrays_are_written_as_the_table_pandas_would_write(tmp_path):
    # Prepare: two runs' blocks (keys differ), labels and disciplines as the engine keeps them (the disciplines
    # repeat), and dict rows before them as a table
    import pyarrow as pa
    import pyarrow.feather as feather

    from sim.core.results import frame, metric_blocks, metric_blocks_arrow

    labels = pd.array(["global", "a", "b", "c"], dtype="string")
    disciplines = pd.array(["global", "medicine", "physics", "medicine"], dtype="string")
    names = ("accuracy", "loss", "train_loss")
    rng = np.random.default_rng(0)
    blocks = [({"run_id": run, "scheme": "fedavg", "scenario": "s", "seed": seed}, r, rng.integers(0, 4, 7),
               rng.integers(0, 3, 7), rng.random(7)) for run, seed in (("r1", 0), ("r2", 1)) for r in range(3)]
    before = metric_blocks(blocks[:1], labels, disciplines, names).assign(institution="z", discipline="law")
    expected = pd.concat([before, metric_blocks(blocks, labels, disciplines, names)], ignore_index=True)
    # Execute: built in Arrow with plain strings, and as a checkpoint segment writes and reads them
    plain = metric_blocks_arrow(blocks, labels, disciplines, names,
                                pa.Schema.from_pandas(frame("metrics", []), preserve_index=False))
    (tmp_path / "previous").mkdir()
    feather.write_feather(plain, tmp_path / "previous" / "metrics.arrow")  # as the previous version wrote segments
    checkpoint._write_rows(tmp_path / "metrics.arrow", "metrics", [before], blocks, (labels, disciplines, names))
    # Assert: the rows, dtypes and values pandas' own table has, read back from either; the segment stores the
    # strings as dictionaries
    pd.testing.assert_frame_equal(checkpoint._read_rows(tmp_path / "previous", "metrics"),
                                  metric_blocks(blocks, labels, disciplines, names), check_exact=True)
    pd.testing.assert_frame_equal(checkpoint._read_rows(tmp_path, "metrics"), expected, check_exact=True)
    stored = feather.read_table(tmp_path / "metrics.arrow")
    assert pa.types.is_dictionary(stored.schema.field("discipline").type)
    assert stored.column("discipline").chunk(0).dictionary.to_pylist() == ["law", "global", "medicine", "physics"]


def test_a_line_behind_a_checkpoint_being_written_follows_it_without_holding_the_round_up():
    # Prepare: a checkpoint whose writing is held until released, then one that fails
    import threading

    progress, said, release = checkpoint.Progress(), [], threading.Event()

    def slow():
        release.wait(10)
        said.append("checkpoint written")

    progress.writing = checkpoint._writer().submit(slow)
    # Execute: two rounds' lines are handed over while the checkpoint is still being written
    progress.after(lambda: said.append("round 6"))
    progress.after(lambda: said.append("round 7"))
    before = list(said)
    release.set()
    progress.wait()
    # Assert: nothing waited for the writing; the lines came after the checkpoint's, in order
    assert before == [] and said == ["checkpoint written", "round 6", "round 7"]
    # ... and behind a failed writing no line is said, and wait() raises its error
    failing = threading.Event()
    progress.writing = checkpoint._writer().submit(lambda: failing.wait(10) and 1 / 0)
    progress.after(lambda: said.append("round 8"))
    failing.set()
    with pytest.raises(ZeroDivisionError):
        progress.wait()
    assert said[-1] == "round 7"


def test_without_a_checkpoint_resume_starts_over(small_cfg, reference, tmp_path):
    cfg = small_cfg("rounds=3", "checkpoint_every=1", "scheme=fedavg", *FLAKY)
    with pytest.raises(Stop):
        run(cfg, tmp_path, backend="inprocess", on_round=stop_after(1))
    (tmp_path / "checkpoints" / "latest.json").unlink()  # as if it died before writing one
    run(compose("config", [f"resume={tmp_path}"]), backend="inprocess")
    assert pd.read_parquet(tmp_path / "metrics.parquet").equals(pd.read_parquet(reference("fedavg") / "metrics.parquet"))


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(small_cfg, tmp_path, monkeypatch):
    cfg = small_cfg("rounds=3", "checkpoint_every=1")
    real = checkpoint._save_arrays

    def dies_in_round_2(path, groups):
        if '"round": 2' in (path.parent / "meta.json").read_text():
            raise Stop("died mid-write")
        real(path, groups)

    monkeypatch.setattr(checkpoint, "_save_arrays", dies_in_round_2)
    with pytest.raises(Stop):
        run(cfg, tmp_path, backend="inprocess")
    # The pointer still names round 1, whose directory is whole; the half-written one is not it.
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["round"] == 1
    progress, _ = checkpoint.load(tmp_path, status(tmp_path)["run_id"])
    assert progress.rounds_done == 1


def test_checkpoints_hold_no_pickles(small_cfg, tmp_path):
    with pytest.raises(Stop):
        run(small_cfg("rounds=3", "checkpoint_every=1", "scheme=pooled"), tmp_path, backend="inprocess",
            on_round=stop_after(2))
    where = tmp_path / "checkpoints" / "round-00002"
    for npz in where.glob("*.npz"):
        with np.load(npz, allow_pickle=False) as arrays:  # raises if any array needs pickle
            assert all(arrays[k].dtype != object for k in arrays.files)
        assert all(n.endswith(".npy") for n in zipfile.ZipFile(npz).namelist())
    assert {p.suffix for p in where.iterdir()} == {".json", ".npz"}
    # Results rows live in one segment per checkpoint, each holding only the rounds since the one before.
    segments = sorted(p.name for p in (tmp_path / "checkpoints").glob("rows-*"))
    assert segments == ["rows-00001", "rows-00002"]
    rounds = [set(pd.read_feather(tmp_path / "checkpoints" / s / "ledger.arrow")["round"]) for s in segments]
    assert rounds == [{1}, {2}]


def test_status_says_running_then_complete(small_cfg, tmp_path):
    seen = []
    run(small_cfg(), tmp_path, backend="inprocess", on_round=lambda r, s: seen.append(status(tmp_path)["state"]))
    assert seen == ["running", "running"] and status(tmp_path)["state"] == "complete"
    assert status(tmp_path)["rounds_done"] == 2 and status(tmp_path)["error"] is None


def test_a_failed_run_says_why(small_cfg, tmp_path):
    with pytest.raises(Stop):
        run(small_cfg(), tmp_path, backend="inprocess", on_round=stop_after(1))
    assert status(tmp_path) | {"updated": None} == {
        "state": "failed", "rounds_done": 1, "rounds": 2, "run_id": status(tmp_path)["run_id"],
        "error": "Stop: stopped after round 1", "institutions": None, "updated": None}


def test_resuming_a_complete_run_changes_nothing(small_cfg, tmp_path):
    first = run(small_cfg(), tmp_path, backend="inprocess")
    again = run(compose("config", [f"resume={tmp_path}"]), backend="inprocess")
    pd.testing.assert_frame_equal(first.metrics, again.metrics)


def test_a_coalition_resumes_as_that_coalition(small_cfg, tmp_path):
    members = ("city_hospital", "credit_union")
    with pytest.raises(Stop):
        run(small_cfg("checkpoint_every=1"), tmp_path, backend="inprocess", institutions=members, on_round=stop_after(1))
    result = run(compose("config", [f"resume={tmp_path}"]), backend="inprocess")
    assert set(result.institutions.institution) == set(members) and result.run_id.endswith("city_hospital+credit_union")


@pytest.mark.parametrize("make, problem", [
    (lambda d: None, "no such directory"),
    (lambda d: d.mkdir(), "no config.yaml"),
])
def test_resume_needs_a_run_directory(make, problem, tmp_path):
    from sim.checks import load_spec

    make(tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        load_spec(compose("config", [f"resume={tmp_path / 'run'}"]))
    assert err.value.key == "resume" and problem in str(err.value)


def test_a_checkpoint_of_another_run_is_refused(small_cfg, tmp_path):
    with pytest.raises(Stop):
        run(small_cfg("checkpoint_every=1"), tmp_path, backend="inprocess", on_round=stop_after(1))
    (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace("seed: 0", "seed: 1"))
    with pytest.raises(ConfigError, match="belongs to run"):
        run(compose("config", [f"resume={tmp_path}"]), backend="inprocess")


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(small_cfg, tmp_path):
    import json

    with pytest.raises(Stop):
        run(small_cfg("checkpoint_every=1"), tmp_path, backend="inprocess", on_round=stop_after(1))
    latest = tmp_path / "checkpoints" / json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["dir"]
    meta = json.loads((latest / "meta.json").read_text())
    (latest / "meta.json").write_text(json.dumps(meta | {"format": 2}))
    with pytest.raises(ConfigError, match="format 2 and this collabsim reads format 3; delete") as err:
        run(compose("config", [f"resume={tmp_path}"]), backend="inprocess")
    assert "\n" not in str(err.value)


def test_resume_on_the_command_line_writes_into_the_run_directory_and_refuses_other_overrides(tmp_path):
    assert resume_overrides(["scheme=fedavg"]) == []
    assert resume_overrides([f"resume={tmp_path}"]) == [f"hydra.run.dir='{tmp_path}'", "hydra.output_subdir=null"]
    with pytest.raises(ConfigError, match="keeps its saved config; drop 'rounds=5'"):
        resume_overrides([f"resume={tmp_path}", "rounds=5"])
    with pytest.raises(ConfigError, match="drop 'engine.vectorise=false'"):  # equal only to float rounding: refused
        resume_overrides([f"resume={tmp_path}", "placement=pooled", "engine.vectorise=false"])
    # How it runs may change: placement, the cluster (a group or its keys), the backend, hosts, checkpoints
    allowed = ["placement=pooled", "cluster=existing", "cluster.address=auto", "engine.backend=inprocess",
               "engine.pooled_hosts=2", "checkpoint_every=2"]
    assert resume_overrides([f"resume={tmp_path}", *allowed])[0] == f"hydra.run.dir='{tmp_path}'"
    with pytest.raises(ConfigError, match="run directory"):
        resume_overrides(["resume=true"])


def test_a_resume_may_change_how_it_runs_and_gives_the_same_numbers(small_cfg, tmp_path):
    # Prepare: one actor per institution, stopped after round 1; and the same run uninterrupted
    cfg = small_cfg("rounds=3", "checkpoint_every=1", "placement=dedicated", *FLAKY)
    with pytest.raises(Stop):
        run(cfg, tmp_path, backend="inprocess", on_round=stop_after(1))
    saved = (tmp_path / "config.yaml").read_text()
    full = run(cfg, backend="inprocess")
    # Execute: resumed pooled on two hosts, in this process (engine.backend from the command, not the saved ray)
    resumed = run(compose("config", [f"resume={tmp_path}", "placement=pooled", "engine.pooled_hosts=2",
                                     "engine.backend=inprocess"]))
    # Assert: the same run (id, config.yaml) and the same numbers, bit for bit
    assert resumed.run_id == full.run_id and (tmp_path / "config.yaml").read_text() == saved
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "metrics.parquet"), full.metrics)
    assert status(tmp_path)["state"] == "complete"
