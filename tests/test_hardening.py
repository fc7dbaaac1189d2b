"""Hardening: run directories are never clobbered, bad data is refused, every damaged input is one line."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.core import rundir
from sim.cli import compose
from sim.checks import load_spec
from sim.engine import Diverged, run
from sim.core.types import ConfigError
from stopping import Stop, stop_after

REPO = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: 'untouched' means this does not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. run directories are never clobbered ------------------------------------------------------

def test_a_directory_holding_a_run_is_refused_untouched_until_overwrite(small_cfg, tmp_path):
    # Prepare: a finished run
    first = run(small_cfg(), tmp_path, backend="inprocess")
    before = snapshot(tmp_path)
    # Execute / Assert: a second run into it is refused and changes no byte
    with pytest.raises(ConfigError) as err:
        run(small_cfg("seed=1"), tmp_path, backend="inprocess")
    assert str(err.value) == (f"hydra.run.dir: {tmp_path} already holds a run; pass overwrite=true to replace it "
                              "or choose another hydra.run.dir")
    assert snapshot(tmp_path) == before
    # overwrite=true replaces it, with the run id the config has without the flag
    again = run(small_cfg("seed=1", "overwrite=true"), tmp_path, backend="inprocess")
    assert again.run_id == load_spec(small_cfg("seed=1")).run_id != first.run_id
    assert set(pd.read_parquet(tmp_path / "metrics.parquet")["seed"]) == {1}
    assert not (tmp_path / rundir.LOCK).exists()  # the lock goes with the run


def test_hydra_own_files_are_not_foreign_but_a_users_files_are(small_cfg, tmp_path):
    hydra_made = tmp_path / "hydra_made"
    (hydra_made / ".hydra").mkdir(parents=True)
    (hydra_made / "__main__.log").write_text("")
    run(small_cfg(), hydra_made, backend="inprocess")  # what Hydra wrote before our code ran is fine
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my thesis")
    with pytest.raises(ConfigError, match=r"already holds files that are not a run \(notes.txt\)"):
        run(small_cfg(), mine, backend="inprocess")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    run(small_cfg("overwrite=true"), mine, backend="inprocess")
    assert (mine / "notes.txt").read_text() == "my thesis"  # overwrite replaces runs, never a user's own files


def test_overwrite_is_not_part_of_the_run(small_cfg):
    plain, forced = load_spec(small_cfg()), load_spec(small_cfg("overwrite=true"))
    assert plain.run_id == forced.run_id and "overwrite" not in forced.config


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path, caplog):
    host = socket.gethostname()
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process
    with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getppid()} on {host}\\)"):
        rundir.acquire(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": dead.pid, "host": host}))
    with caplog.at_level(logging.WARNING, logger="collabsim"):
        rundir.acquire(tmp_path)
    assert "no longer running" in caplog.text
    assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    rundir.release(tmp_path)
    assert not (tmp_path / rundir.LOCK).exists()


def test_a_run_refuses_a_directory_another_run_is_writing(small_cfg, tmp_path):
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(ConfigError, match="in use by another run"):
        run(small_cfg(), tmp_path, backend="inprocess")
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.LOCK]


def test_a_poisoners_target_label_out_of_range_is_refused_before_the_run_directory_is_written(small_cfg, tmp_path):
    # Prepare: half of six institutions poison their data towards label 20 of a ten-class dataset
    cfg = small_cfg("scenario.num_institutions=6", "scenario.behaviours={data_poisoning: 0.5}")
    # Execute
    with pytest.raises(ConfigError, match=r"target_label: is 20 but the data has 10 classes \(0..9\): 3 institution\(s\) set it"):
        run(small_cfg("scenario.num_institutions=6", "scenario.behaviours={data_poisoning: 0.5}",
                      "scenario.target_label=20"), tmp_path, backend="inprocess")
    # Assert: nothing was written, so the corrected command runs in the same directory
    assert snapshot(tmp_path) == {}
    run(cfg, tmp_path, backend="inprocess")
    assert checkpoint_state(tmp_path) == "complete"


def test_a_run_refused_before_its_first_round_does_not_block_the_corrected_command(small_cfg, tmp_path, monkeypatch):
    # Prepare: bad input that only an actor finds (here: its merge refuses) stops the run in round 1
    from agents.coordinator import Coordinator

    def refuse(self, ctx, lost, *updates):
        raise ConfigError("aggregator.byzantine", "refused in round 1")

    with monkeypatch.context() as patch:
        patch.setattr(Coordinator, "merge", refuse)
        with pytest.raises(ConfigError, match="refused in round 1"):
            run(small_cfg(), tmp_path, backend="inprocess")
    assert checkpoint_state(tmp_path) == "failed"
    # Execute: the corrected command, into the same directory, without overwrite=true
    run(small_cfg(), tmp_path, backend="inprocess")
    # Assert: it ran, and a run that failed for another reason still holds its directory
    assert checkpoint_state(tmp_path) == "complete"
    (tmp_path / "status.json").write_text(json.dumps({"state": "failed", "rounds_done": 0, "error": "RunFailed: lost"}))
    with pytest.raises(ConfigError, match="already holds a run"):
        run(small_cfg(), tmp_path, backend="inprocess")


def checkpoint_state(folder: Path) -> str:
    """What a run directory's status.json says of its run."""
    return json.loads((folder / "status.json").read_text())["state"]


def test_compare_refuses_a_used_directory_before_any_run(tmp_path):
    from sim.compare import compare

    (tmp_path / "summary.csv").write_text("scheme\n")
    with pytest.raises(ConfigError, match="already holds a run; pass overwrite=true"):
        compare(compose("compare", ["smoke=true"]), [], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_csv_and_tables_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from sim.core import results

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(results.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(results.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    results.write_csv(pd.DataFrame({"a": [1, 2]}), tmp_path / "summary.csv")
    assert events[:2] == ["fsync", "rename"]  # the file's data reaches the disk before its name does
    assert pd.read_csv(tmp_path / "summary.csv")["a"].tolist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]  # no temporary left behind


@pytest.mark.slow
def test_the_command_refuses_a_used_directory_before_hydra_writes_into_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    proc = subprocess.run([sys.executable, "-m", "sim", "smoke=true", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: hydra.run.dir: {out} already holds a run; pass overwrite=true to "
                                   "replace it or choose another hydra.run.dir")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # not even .hydra/ was written


# ---- 2. data is checked before it is trusted -----------------------------------------------------

def table_cfg(path: Path, *extra: str):
    """A natural-partition config over a two-site table."""
    return compose("config", ["smoke=true", "rounds=1", "data=table", f"data.path={path}", "data.partition=natural",
                              "data.institution_column=site", "scenario.num_institutions=null",
                              "scenario.institutions=[{name: x, share: 0.5}, {name: y, share: 0.5}]", *extra])


def good_table(n: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n),
                         "site": np.where(np.arange(n) % 2, "x", "y"), "label": np.arange(n) % 3})


def _with(df, **cells):
    df = df.copy()
    for where, value in cells.items():
        col, row = where.rsplit("_", 1)
        df[col] = df[col].astype(object) if isinstance(value, str) else df[col]
        df.loc[int(row), col] = value
    return df


@pytest.mark.parametrize("make, key, words", [
    (lambda df: df.head(0), "data.path", ["no rows (only a header)"]),
    (lambda df: _with(df, a_7=np.inf), "data.path", ["column 'a'", "infinite", "institution 'x'", "row 8"]),
    (lambda df: _with(df, b_4=np.nan), "data.path", ["column 'b'", "missing", "institution 'y'"]),
    (lambda df: _with(df, b_4=np.nan, b_6=np.nan), "data.path", ["column 'b'", "first at data row 5; 2 rows in all"]),
    (lambda df: df.assign(label=1), "data.label_column", ["one class only (1)"]),
    (lambda df: df.assign(label=np.where(df.site == "x", 0, 1)), "data.label_column",
     ["every institution holds a single class in column 'label'"]),
    (lambda df: _with(df, a_3="abc"), "data.feature_columns", ["column 'a'", "mixes numbers and text", "'abc'"]),
    (lambda df: df.rename(columns={"b": "a"}), "data.path", ["names 1 column(s) more than once: 'a' (2 times)"]),
])
def test_bad_tables_are_refused_naming_file_column_and_institution(make, key, words, tmp_path):
    path = tmp_path / "sites.csv"
    make(good_table()).to_csv(path, index=False)
    with pytest.raises(ConfigError) as err:
        load_spec(table_cfg(path))
    assert err.value.key == key and "sites.csv" in str(err.value) and "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_a_constant_feature_is_warned_about_not_refused(tmp_path, caplog):
    path = tmp_path / "sites.csv"
    good_table().assign(c=2.0).to_csv(path, index=False)
    with caplog.at_level(logging.WARNING, logger="collabsim"):
        load_spec(table_cfg(path))
    assert "column 'c' of sites.csv is constant (2.0)" in caplog.text


def test_a_metric_that_turns_nan_fails_the_run_naming_round_and_institution(small_cfg, tmp_path):
    # lr 1e30 sends the weights to infinity in the first round: losses become NaN.
    with pytest.raises(Diverged, match=r"round 1: the loss of institution '\w+' is nan"):
        run(small_cfg("training.lr=1e30"), tmp_path, backend="inprocess")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["rounds_done"] == 0 and "round 1" in status["error"]


# ---- 3. every damaged input is one line ----------------------------------------------------------

@pytest.fixture
def stopped(small_cfg, tmp_path):
    """A run stopped after round 1 of 2 with a checkpoint."""
    with pytest.raises(Stop):
        run(small_cfg("checkpoint_every=1"), tmp_path, backend="inprocess", on_round=stop_after(1))
    return tmp_path


def _garble(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("damage, why", [
    (lambda c: _garble(c / "round-00001" / "coordinator.npz"), "BadZipFile"),
    (lambda c: (c / "round-00001" / "meta.json").write_text("{not json"), "JSONDecodeError"),
    (lambda c: (c / "latest.json").write_text("[1, 2]"), "TypeError"),
    (lambda c: (c / "rows-00001" / "metrics.arrow").unlink(), "FileNotFoundError"),
    (lambda c: _garble(c / "rows-00001" / "ledger.arrow"), "ArrowInvalid"),
])
def test_a_damaged_checkpoint_is_one_line(damage, why, stopped):
    damage(stopped / "checkpoints")
    with pytest.raises(ConfigError) as err:
        run(compose("config", [f"resume={stopped}"]), backend="inprocess")
    text = str(err.value)
    assert text.startswith(f"resume: {stopped}: the checkpoint cannot be read ({why}") and "\n" not in text
    assert not (stopped / rundir.LOCK).exists()


def test_a_resume_of_an_edited_config_is_refused_naming_the_keys(stopped):
    cfg = stopped / "config.yaml"
    cfg.write_text(cfg.read_text().replace("seed: 0", "seed: 7").replace("lr: 0.05", "lr: 0.1"))
    with pytest.raises(ConfigError, match=r"config.yaml was edited after the run \(changed: seed, training.lr\)"):
        load_spec(compose("config", [f"resume={stopped}"]))


def test_an_unedited_resume_still_continues(stopped):
    result = run(compose("config", [f"resume={stopped}"]), backend="inprocess")
    assert result.metrics["round"].max() == 2


@pytest.mark.parametrize("write, words", [
    (lambda p: p.write_bytes(b"PAR1 this is not parquet"), "cannot be read as a metrics table"),
    (lambda p: pd.DataFrame({"x": [1]}).to_parquet(p), "not a collabsim metrics table (no column run_id"),
])
def test_the_report_names_a_damaged_or_foreign_table(write, words, tmp_path, capsys):
    from analysis.__main__ import main

    (tmp_path / "run").mkdir()
    write(tmp_path / "run" / "metrics.parquet")
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'run' / 'metrics.parquet'}: {words}") and err.count("\n") == 1


def test_resuming_a_sweep_folder_from_elsewhere_needs_sweep_trust(tmp_path):
    from sim.sweep import check_trust

    with pytest.raises(ConfigError, match="sweep_trust: .*no collabsim-sweep.json.*unpickles"):
        check_trust(tmp_path, trusted=False)
    (tmp_path / rundir.SWEEP_MARKER).write_text(json.dumps({"user": "someone", "host": "elsewhere"}))
    with pytest.raises(ConfigError, match="made by someone on elsewhere"):
        check_trust(tmp_path, trusted=False)
    check_trust(tmp_path, trusted=True)  # the user vouches for it
    rundir.write_marker(tmp_path, rundir.SWEEP_MARKER)
    check_trust(tmp_path, trusted=False)  # made by this user on this host


def test_requests_the_local_cluster_cannot_meet_are_refused_before_ray(small_cfg):
    big = ["scenario.num_institutions=3", "scenario.cpus=64", "placement=pooled", "cluster.num_cpus=2"]
    with pytest.raises(ConfigError, match=r"scenario.institutions\[0\].cpus: .*64 CPUs but the local cluster has 2"):
        load_spec(small_cfg(*big))
    gpu = ["scenario.num_institutions=2", "scenario.gpus=1", "engine.gpu_policy=require", "cluster.num_gpus=0"]
    with pytest.raises(ConfigError, match=r"gpus: .*asks for 1 GPUs but the local cluster has 0"):
        load_spec(small_cfg(*gpu))
    load_spec(small_cfg(*big[:2], "placement=pooled", "cluster.num_cpus=64"))  # fits a 64-CPU cluster
    load_spec(small_cfg("cluster.address=auto", "scenario.cpus=64", "scenario.num_institutions=3"))  # remote: unknown


# ---- 4. cluster.address ----------------------------------------------------------------------------

def test_a_dashboard_without_its_packages_is_refused_before_ray(small_cfg, monkeypatch):
    from sim import checks

    # Prepare: one of the dashboard's packages missing (whatever this environment has)
    monkeypatch.setattr(checks, "DASHBOARD_MODULES", ("json", "no_such_dashboard_package"))
    # Execute / Assert: one line naming the key, what is missing and the fix; off (the default) is never checked
    with pytest.raises(ConfigError, match=r"^cluster.dashboard: Ray's dashboard needs packages this environment lacks "
                                          r"\(no_such_dashboard_package\): pip install 'ray\[default\]'"):
        load_spec(small_cfg("cluster.dashboard=true"))
    load_spec(small_cfg())
    monkeypatch.setattr(checks, "DASHBOARD_MODULES", ("json",))  # all present
    load_spec(small_cfg("cluster.dashboard=true"))


@pytest.mark.parametrize("address", ["not-a-host:99999", "head", "http://head:6379", "ray://:10001", "a b:1",
                                     "head:0"])
def test_a_malformed_cluster_address_is_refused_before_ray(address, small_cfg):
    with pytest.raises(ConfigError) as err:
        load_spec(small_cfg(f"cluster.address='{address}'"))
    assert err.value.key == "cluster.address"


def test_an_unreachable_cluster_fails_within_the_timeout(tmp_path):
    from agents.runtime.cluster import _join

    class NoRay:  # the probe must fail before Ray is asked to connect (a session-wide test cluster may be up)
        @staticmethod
        def init(**kwargs):
            raise AssertionError("ray.init reached")

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    t0 = time.perf_counter()
    for address in (f"127.0.0.1:{port}", "no-such-host.invalid:6379", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=f"cluster.address: cannot reach {address} within 2s"):
            _join(NoRay, address, 2.0, {"address": address})
    assert time.perf_counter() - t0 < 30
