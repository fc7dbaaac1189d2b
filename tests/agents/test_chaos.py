"""Chaos: host actors killed, frozen or broken mid-run, the coordinator lost, the driver killed.

Runs either finish with exactly the fault model's semantics (a lost host costs its
institutions that one round: as if their local step had failed) or stop, say so, and
resume to the very numbers an uninterrupted run gives.
"""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sim import engine
from sim.core import faults
from sim.cli import compose
from sim.engine import run
from sim.core.types import RunFailed

SEED = int(os.environ.get("COLLABSIM_CHAOS_SEED", "0"))  # picks the rounds and hosts that are hit; any value must pass
BASE = ["data.num_samples=600"]
ONE_HOST = ["placement=pooled", "engine.pooled_hosts=1"]  # two actors to start, not seven: these tests are about the run


def values(result):
    m = result.metrics.sort_values(["round", "institution", "metric"]).reset_index(drop=True)
    return m[["round", "institution", "metric", "value"]]


@pytest.fixture
def backends(monkeypatch):
    """The Ray backends the engine starts during a test, so the test can signal their actors."""
    started = []
    real = engine._start_backend

    def keep(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(engine, "_start_backend", keep)
    return started


def failing(monkeypatch, lost):
    """Make this process's fault model fail exactly the (round, institution) pairs in ``lost``."""
    draw = faults.draw
    monkeypatch.setattr(faults, "draw", lambda s, seed, r: faults.FAILED if (r, s.name) in lost else draw(s, seed, r))


def test_hosts_killed_frozen_or_broken_at_random_rounds_cost_their_institutions_that_round_only(
        ray_cluster, monkeypatch, caplog):
    # Prepare: five rounds of isolated training (personal models must survive restarts) on two pooled hosts;
    # after three random rounds a random host is SIGKILLed, SIGSTOPped (misses the deadline) or made to raise. A
    # round's hosts are asked to train it as the round before ends, behind their scoring of that round: the strike
    # lands once that scoring is done, just before they are asked.
    from agents.runtime import backend

    rng = random.Random(SEED)
    strikes = dict(zip(sorted(rng.sample(range(1, 5), 3)), rng.sample(["kill", "freeze", "raise"], 3)))
    cfg = compose("config", [*BASE, "rounds=5", "scheme=isolated", "placement=pooled", "engine.pooled_hosts=2",
                             "engine.round_timeout_s=10"])
    hit, frozen = {}, []  # round -> (members of the host lost in it, their expected status)
    real_train = backend.RayBackend._train

    def train(b, ctx):
        r = ctx.round - 1
        if r in strikes and r + 1 not in hit:
            scoring = list(b.scoring[2][1].values()) if b.scoring else []
            ray_cluster.wait(scoring, num_returns=len(scoring))
            strike(b, r)
        return real_train(b, ctx)

    monkeypatch.setattr(backend.RayBackend, "_train", train)

    def strike(b, r):
        j = rng.randrange(len(b.hosts))
        members = sorted(b.members[j], key=b.order.get)  # scenario order, as the log names them
        if strikes[r] == "kill":
            os.kill(b.pids[j], signal.SIGKILL)
        elif strikes[r] == "freeze":
            os.kill(b.pids[j], signal.SIGSTOP)
            frozen.append(b.pids[j])
        else:  # a personal model that no longer fits: the host's next local step raises
            broken = {members[0]: {"uploaded_data": np.asarray(False), "personal/nonsense": np.zeros(3, np.float32)}}
            ray_cluster.get(b.hosts[j].restore.remote(broken))
        hit[r + 1] = (members, "timeout" if strikes[r] == "freeze" else "crashed")

    # Execute
    try:
        chaos = run(cfg)
    finally:
        for pid in frozen:  # the backend gave up on it; make sure the frozen process goes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # Assert: the hit host's institutions are marked for that round and back the next; everyone else is fine
    plan = f"seed {SEED}: strikes after rounds {strikes}, hosts lost {hit}"
    ledger = chaos.ledger[chaos.ledger.institution != "global"]
    status = {(r.round, r.institution): r.status for r in ledger.itertuples()}
    expected = {key: "ok" for key in status} | {(r, n): s for r, (names, s) in hit.items() for n in names}
    assert status == expected, plan
    logged = caplog.text
    for r, (names, s) in hit.items():
        assert f"round {r}: {', '.join(names)} {s}" in logged, plan
    if "raise" in strikes.values():
        assert "KeyError: \"state has keys the model does not" in logged, plan
    # ... and the numbers are those of the same run in which those institutions' local steps failed.
    failing(monkeypatch, {(r, n) for r, (names, _) in hit.items() for n in names})
    reference = run(cfg, backend="inprocess")
    pd.testing.assert_frame_equal(values(chaos), values(reference), obj=plan)


def test_a_host_lost_while_scoring_with_the_next_round_asked_of_it_costs_nothing(ray_cluster, monkeypatch, caplog):
    # Prepare: isolated training (personal models) on two pooled hosts. In round 2 one host is stopped before it is
    # asked to score, and killed once it has been asked to train round 3 too: both calls are lost with it.
    from agents.runtime import backend

    cfg = compose("config", [*BASE, "rounds=4", "scheme=isolated", "placement=pooled", "engine.pooled_hosts=2",
                             "engine.round_timeout_s=10"])
    seen: dict = {}
    real = {name: getattr(backend.RayBackend, name) for name in ("train_and_merge", "_score", "_train")}

    def train_and_merge(b, ctx, *args, **kwargs):
        seen["round"] = ctx.round
        return real["train_and_merge"](b, ctx, *args, **kwargs)

    def score(b, plan, only):
        if seen.get("round") == 2 and "pid" not in seen:
            seen["pid"] = b.pids[1]
            os.kill(seen["pid"], signal.SIGSTOP)
        return real["_score"](b, plan, only)

    def train(b, ctx):
        calls = real["_train"](b, ctx)
        if ctx.round == 3 and "pid" in seen and "killed" not in seen:
            seen["killed"] = 1 in calls  # round 3's training was asked of the stopped host
            os.kill(seen["pid"], signal.SIGKILL)
        return calls

    for name, method in (("train_and_merge", train_and_merge), ("_score", score), ("_train", train)):
        monkeypatch.setattr(backend.RayBackend, name, method)
    # Execute
    struck = run(cfg)
    # Assert: the host's scoring is redone on its replacement, which trains round 3 as asked: nobody's round is
    # lost, and the numbers are an uninterrupted run's
    assert seen.get("killed") is True
    assert "scoring" in caplog.text and "restarting their host" in caplog.text
    assert set(struck.ledger.status) <= {"ok", "idle"}
    monkeypatch.undo()
    pd.testing.assert_frame_equal(values(struck), values(run(cfg, backend="inprocess")))


def test_a_lost_coordinator_stops_the_run_which_resumes_exactly(ray_cluster, backends, tmp_path):
    # Prepare: the coordinator actor is killed after round 1; a checkpoint is written every round
    cfg = compose("config", [*BASE, *ONE_HOST, "smoke=true", "rounds=3", "checkpoint_every=1", "scheme=fedavg"])

    def lose(r, summary):
        if r == 1:
            ray_cluster.kill(backends[-1].coordinator)

    # Execute
    with pytest.raises(RunFailed, match="coordinator"):
        run(cfg, tmp_path, on_round=lose)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["rounds_done"] == 1 and "coordinator" in status["error"]
    run(compose("config", [f"resume={tmp_path}"]), backend="inprocess")  # where it resumes does not matter
    # Assert
    reference = run(cfg, backend="inprocess")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "metrics.parquet"), reference.metrics)


def test_a_killed_driver_resumes_to_an_identical_metrics_table(ray_cluster, tmp_path):
    # Prepare: `python -m sim` on the session's cluster, checkpointing every round, SIGKILLed once
    # round 2's progress line is out (the line follows the round's checkpoint).
    args = [*BASE, *ONE_HOST, "smoke=true", "rounds=3", "checkpoint_every=1", "scheme=isolated",
            f"cluster.address={ray_cluster.get_runtime_context().gcs_address}"]
    out = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-m", "sim", *args, f"hydra.run.dir={out}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if "round 2/3" in line:
            driver.send_signal(signal.SIGKILL)
            break
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "".join(seen[-20:])
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "running" and status["rounds_done"] == 2  # what analysis sees: not complete
    assert not (out / "metrics.parquet").exists()
    # Execute
    resumed = subprocess.run([sys.executable, "-m", "sim", f"resume={out}"], capture_output=True, text=True, timeout=300)
    # Assert: the resumed run did round 3 only and its table equals an uninterrupted run's
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resuming" in log and "round 3/3" in log and "round 2/3" not in log
    reference = run(compose("config", args), backend="inprocess")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet"), reference.metrics)
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
