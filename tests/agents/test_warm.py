"""Warm actors: one pool of processes serves many runs, with the numbers fresh actors give."""

import subprocess
import sys

import pandas as pd
import pytest

from agents.runtime.warm import ActorPool
from sim.engine import run


def values(result):
    m = result.metrics.sort_values(["round", "institution", "metric"]).reset_index(drop=True)
    return m[["round", "institution", "metric", "value"]]


def test_a_pool_serves_several_runs_with_the_processes_it_started_once(small_cfg, ray_cluster, monkeypatch):
    # Prepare: count the pids the backends report; three runs (two schemes, two seeds) share one pool
    from agents.runtime import backend

    pids = []
    real = backend.RayBackend.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        pids.append(tuple(self.pids))

    monkeypatch.setattr(backend.RayBackend, "__init__", spy)
    two_hosts = ["placement=pooled", "engine.pooled_hosts=2"]
    pool = ActorPool()
    try:
        # Execute
        warm = [run(small_cfg(*two_hosts, f"scheme={s}", f"seed={seed}"), pool=pool)
                for s, seed in (("isolated", 0), ("fedavg", 0), ("fedavg", 1))]
    finally:
        pool.close()
    # Assert: the same host processes every time, and each run's numbers are those of a run with no pool at all
    assert len(set(pids)) == 1 and len(pids[0]) == 2
    for result, (s, seed) in zip(warm, (("isolated", 0), ("fedavg", 0), ("fedavg", 1))):
        alone = run(small_cfg(f"scheme={s}", f"seed={seed}"), backend="inprocess")
        pd.testing.assert_frame_equal(values(result), values(alone), check_exact=True)


def test_a_run_that_failed_hands_back_no_actors(small_cfg, ray_cluster):
    # A coordinator killed mid-run must not serve the next run: the backend ends its actors instead.
    from agents.runtime.backend import RayBackend
    from sim import engine

    pool, started = ActorPool(), []
    real = engine._start_backend

    def keep(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    engine._start_backend = keep
    try:
        def lose(r, summary):
            ray_cluster.kill(started[-1].coordinator)

        try:
            run(small_cfg("placement=pooled", "engine.pooled_hosts=1"), pool=pool, on_round=lose)
        except Exception:  # noqa: BLE001 - the run fails; what matters is the pool afterwards
            pass
        assert isinstance(started[-1], RayBackend) and started[-1].broken
        assert pool.idle_coordinators == [] and pool.idle_hosts == []
        # ... and the next run through the pool starts fresh actors and completes.
        assert run(small_cfg("placement=pooled", "engine.pooled_hosts=1"), pool=pool).metrics is not None
    finally:
        engine._start_backend = real
        pool.close()


def test_a_local_cluster_preloads_the_actors_code_and_a_joined_one_is_left_alone(monkeypatch):
    import ray

    from agents.runtime import cluster

    # Prepare: record what ray.init is asked, start nothing
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(cluster, "_placement_group_resources", lambda: None)
    monkeypatch.setattr(cluster, "_join", lambda ray_, address, timeout, kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "STARTED", [])  # nothing really starts: no later disconnect() may act on it
    # Execute
    cluster.connect({"num_cpus": 2})
    cluster.connect({"num_cpus": 2}, preload=("sim.engine", *cluster.PRELOAD))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cluster.connect({"num_cpus": 2})
    cluster.connect({"address": "127.0.0.1:6379"})
    monkeypatch.delenv("RAY_ADDRESS")
    cluster.connect({"num_cpus": 2, "dashboard": True})
    # Assert: workers of a cluster started here import the actors' code and, with no dashboard to read them, record no
    # task events; nothing is asked of one being joined
    off = {"task_events_report_interval_ms": 0}
    inline = {"max_direct_call_object_size": 1 << 20}  # a round's updates and scores return in the reply
    assert calls[0]["_system_config"] == {"preload_python_modules": ["agents.runtime.warm"], **inline, **off}
    assert calls[1]["_system_config"] == {"preload_python_modules": ["sim.engine", "agents.runtime.warm"], **inline,
                                          **off}
    assert "_system_config" not in calls[2] and "_system_config" not in calls[3]
    assert calls[0]["_node_ip_address"] == "127.0.0.1" and calls[0]["include_dashboard"] is False
    # ... and the dashboard runs only when asked for, on the loopback address
    assert calls[4]["include_dashboard"] is True and calls[4]["dashboard_host"] == "127.0.0.1"
    assert calls[4]["_system_config"] == {"preload_python_modules": ["agents.runtime.warm"], **inline}  # events kept
    assert "dashboard_host" not in calls[0]


def test_a_command_ends_the_cluster_it_started_and_leaves_any_other_running(ray_cluster):
    from agents.runtime import cluster

    # Prepare: this process's cluster was started by the session, not by connect()
    cluster.connect({"num_cpus": 4})
    # Execute
    cluster.disconnect()
    # Assert: still running; and in a process of its own, connect() starts a cluster that disconnect() ends
    assert ray_cluster.is_initialized()
    code = ("import ray; from agents.runtime import cluster; cluster.connect({'num_cpus': 1}); "
            "assert cluster.STARTED and ray.is_initialized(); cluster.disconnect(); "
            "assert not cluster.STARTED and not ray.is_initialized()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_error_raised_in_an_actor_reaches_the_user_as_its_own_line(ray_cluster):
    # Prepare: an actor body wrapped as the warm actors are, raising a refusal and an error whose constructor takes
    # two arguments (the kind Ray fails to rebuild in the driver: "Failed to deserialize exception")
    import pytest

    from agents.runtime.backend import RayBackend
    from agents.runtime.warm import WarmCoordinator, WarmHost, errors_travel
    from sim.core.types import ConfigError, RunFailed

    class Picky(Exception):
        def __init__(self, code, why):
            super().__init__(f"code {code}: {why}")

    @errors_travel
    class Body:
        def refuse(self):
            raise ConfigError("aggregator.byzantine", "needs 5 updates")

        def picky(self):
            raise Picky(7, "no shard left")

    actor = ray_cluster.remote(Body).remote()
    runner = object.__new__(RayBackend)  # only what _get reads
    runner.ray, runner.timeout, runner.broken = ray_cluster, 60.0, False
    # Execute / Assert: the refusal is the very ConfigError in-process gives, the other its type and line
    with pytest.raises(ConfigError) as refusal:
        runner._get(actor.refuse.remote(), "round 1: the coordinator failed to merge")
    assert str(refusal.value) == "aggregator.byzantine: needs 5 updates"
    with pytest.raises(RunFailed) as failure:
        runner._get(actor.picky.remote(), "round 1: the coordinator failed to merge")
    assert str(failure.value) == "round 1: the coordinator failed to merge: Picky: code 7: no shard left"
    # and the real actor bodies carry the wrapping
    assert WarmCoordinator.merge.__wrapped__ and WarmHost.train.__wrapped__


def test_a_run_borrows_the_data_and_actors_made_early_and_computes_the_same_numbers(small_cfg, ray_cluster):
    # Prepare: what start_early makes on a warm cluster, made here on the session's cluster: the data, and the
    # coordinator and hosts of the run's layout, idle in a pool
    import ray

    from agents.runtime.placement import plan_layout
    from sim import engine
    from sim.checks import load_spec

    two_hosts = ["placement=pooled", "engine.pooled_hosts=2"]
    spec = load_spec(small_cfg(*two_hosts))
    specs = engine._members(spec)
    fed, flops = engine._build_data(spec, specs)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    layout = plan_layout(spec, specs, cpus, 0.0, None)
    pool = ActorPool()
    pool.give_back((layout.coordinator_cpus, pool.coordinator(layout.coordinator_cpus)),
                   [((h.cpus, h.gpus), pool.host(h.cpus, h.gpus)) for h in layout.hosts])
    early = engine.Early(spec, fed, flops, pool)
    try:
        # Execute
        result = run(small_cfg(*two_hosts), early=early)
        started = pool.started
    finally:
        early.close()
    # Assert: no actor started beyond the early ones, and the numbers of a run that made everything itself
    assert started == 1 + len(layout.hosts) == 3
    pd.testing.assert_frame_equal(values(result), values(run(small_cfg(*two_hosts), backend="inprocess")))


def test_early_start_builds_the_data_before_any_actor_and_nothing_without_a_warm_cluster(small_cfg, monkeypatch):
    # Prepare: a warm cluster on record that would be joined, data that refuse the config, connecting recorded
    from agents.runtime import cluster
    from sim import engine
    from sim.checks import load_spec
    from sim.core.types import ConfigError

    spec = load_spec(small_cfg())
    connected, joinable = [], cluster.joinable
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "joinable", lambda wanted: {"address": "127.0.0.1:1"})
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: connected.append(a))

    def refused(*args):
        raise ConfigError("data.path", "refused")

    monkeypatch.setattr(engine, "_build_data", refused)
    # Execute / Assert: the data's refusal comes before any cluster is joined or actor asked for
    with pytest.raises(ConfigError, match="refused"):
        engine.start_early(spec)
    assert connected == []
    # ... a cluster that fails as it is joined leaves the run to start its actors itself (and say what fails)
    monkeypatch.setattr(engine, "_build_data", lambda spec, specs: (None, 0))

    def broken(*args, **kwargs):
        raise RuntimeError("the raylet went away")

    monkeypatch.setattr(cluster, "connect", broken)
    assert engine.start_early(spec) is None
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: connected.append(a))
    # ... and with no warm cluster, or a run that would not join one, nothing at all is built or started
    assert engine.start_early(load_spec(small_cfg("engine.backend=inprocess"))) is None
    monkeypatch.setattr(cluster, "joinable", joinable)  # the real one: it finds no warm cluster on record
    monkeypatch.setattr(cluster.nodes, "read_record", lambda: None)
    monkeypatch.setattr(engine, "_build_data", refused)
    assert engine.start_early(spec) is None and connected == []
