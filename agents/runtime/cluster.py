"""Ray itself: start a local cluster or join a running one, and end the one a command started.

A local cluster lives on the loopback address with Ray's token authentication on (its
default), no dashboard unless asked (``cluster.dashboard=true``), and workers that import
the actors' code as Ray starts them. Joining a cluster gives up within
``cluster.connect_timeout_s`` with one line. Inside a Tune trial the run is laid out on
what its placement group reserved.

The warm local cluster (``python -m sim.cluster up`` / ``down`` / ``status``; :func:`up`,
:func:`down`, :func:`warm` from Python) is a ``ray start`` head on this machine that outlives
commands: a command with no ``cluster.address`` joins it when it is up and runs the code it
was started with, and leaves it running at exit, so ray.init's and shutdown's seconds are paid
once, not per command (:mod:`agents.runtime.nodes` starts and stops its processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from agents.runtime import nodes

log = logging.getLogger(__name__)
say = logging.getLogger("collabsim")  # the commands' own lines: joining the warm cluster, or why not
LOOPBACK = "127.0.0.1"


PRELOAD = ("agents.runtime.warm",)
"""Modules a local cluster's worker processes import as they start (Ray's ``preload_python_modules``): Ray starts a
worker per CPU at once, so torch and the actors' code are imported while the driver still builds the data, not
after it asks for its actors (about 1.5 s of a command's start on 2 cores)."""

NO_TASK_EVENTS = {"task_events_report_interval_ms": 0}
"""Ray's system config that stops every process of a cluster recording its tasks' events. Only the dashboard's state
API reads them (``ray list tasks``, the timeline), and a cluster collabsim starts has no dashboard unless asked
(``cluster.dashboard=true``, which keeps them); with them on, each driver's ``ray.shutdown`` waits about 0.27 s to
flush them, a tenth of a joined command's start-up and exit."""

INLINE_RESULTS = {"max_direct_call_object_size": 1 << 20}
"""Ray's system config that returns a task's results of up to 1 MiB in its reply to the caller, as Ray does below
100 KiB, instead of through the node's shared-memory object store. A round's updates from a host (50 logistic
regressions: 122 KB) and each host's scores of 5,000 institutions (440 KB) are just above Ray's default. Through the
store each such object cost the raylet about 2.5 ms of CPU, and the actors more: at 10,000 institutions the raylet
used 9.6 ms of CPU a round, and 0.4 ms with this, and the round took 39 to 49 ms instead of 59 to 66 (2 cores,
``scale-10000-all``). Larger results (a foundation model's adapters from many institutions) still go through the store."""

WARM_PRELOAD = ("agents.runtime.preload",)
"""What the warm cluster's workers import: :data:`PRELOAD`'s modules and torch's optimiser machinery too. They load
between commands; a command's own cluster keeps to :data:`PRELOAD`, whose workers load beside the driver on the same
cores (the optimiser's 0.9 s more a worker made such a command's start 1 to 2 s slower on 2 cores)."""


STARTED: list[bool] = []
"""Non-empty once :func:`connect` has started a local cluster in this process (which :func:`disconnect` ends)."""

JOINED: list[bool] = []
"""Non-empty once :func:`connect` has joined the warm local cluster (:func:`disconnect` leaves it running)."""

UNSAID: list[str] = []
"""The line that says this command joined the warm cluster, until :func:`connect` says it (a command that joins before
its logging is set up, :func:`sim.engine.start_early`, says it where its log begins)."""

IDLE_AT_JOIN: set[int] = set()
"""Process ids of the warm cluster's idle workers as this command joined it: owned by no job, they outlive it (idle
workers Ray starts for the command's own job end with it)."""

ROOT = Path(__file__).resolve().parents[2]  # the project whose code the warm cluster's workers import
OWN_CLUSTER_KEYS = ("num_cpus", "num_gpus", "temp_dir", "dashboard")
"""cluster keys that only a cluster started by the command itself can honour: given, the warm cluster is not joined."""


TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
"""Where a user can hand Ray a token of their own (then the token file is theirs to look after)."""


def private_token() -> Path | None:
    """Ray's token file (``~/.ray/auth_token``), readable by its owner alone, before a local cluster starts.

    Ray 2.60's servers listen on every interface whatever node address they are given, so the token
    is what keeps other machines, and other users of this one, from running code as the researcher.
    Ray writes the file with the process's umask (world-readable, 0644, on most systems); it is made
    here first (0600 in a 0700 folder), or tightened if it exists. None when a token is given through
    the environment instead."""
    if any(os.environ.get(v) for v in TOKEN_VARIABLES):
        return None
    token = Path.home() / ".ray" / "auth_token"
    token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token.parent.chmod(0o700)
    try:
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token.chmod(0o600)
        return token
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return token


def connect(cluster: dict[str, Any], preload: tuple[str, ...] = PRELOAD, *, say_joined: bool = True
            ) -> tuple[float, float]:
    """Start or join Ray per the ``cluster`` group; return the cluster's (CPUs, GPUs).

    A cluster started here preloads ``preload`` in its workers; one joined is left as it is. With ``say_joined``
    false, the line that says the warm cluster was joined waits for the next call.
    """
    import ray

    if not ray.is_initialized() and not cluster.get("address") and not os.environ.get("RAY_ADDRESS"):
        record = joinable(cluster)
        if record is not None:
            _join_warm(ray, record)
    if not ray.is_initialized():
        # Ray's token authentication stays on (its default); a local cluster is told to live on the loopback address.
        kwargs: dict[str, Any] = {"address": cluster.get("address"), "include_dashboard": False,
                                  "log_to_driver": True, "configure_logging": False}
        dashboard = bool(cluster.get("dashboard")) and not cluster.get("address")
        if not cluster.get("address"):
            kwargs.update(num_cpus=cluster.get("num_cpus"), num_gpus=cluster.get("num_gpus"),
                          _node_ip_address=LOOPBACK, include_dashboard=dashboard)
            if dashboard:  # asked for (cluster.dashboard=true): served on the loopback address only
                kwargs["dashboard_host"] = LOOPBACK
            if preload and not os.environ.get("RAY_ADDRESS"):  # RAY_ADDRESS joins a running cluster: no system config
                kwargs["_system_config"] = {"preload_python_modules": list(preload), **INLINE_RESULTS,
                                            **({} if dashboard else NO_TASK_EVENTS)}
            if cluster.get("temp_dir"):
                kwargs["_temp_dir"] = str(cluster["temp_dir"])
            cpus = cluster.get("num_cpus")
            private_token()
            log.info("starting a local Ray cluster on %s with %s (a few seconds)", LOOPBACK,
                     "every CPU of this machine" if cpus is None else f"{cpus:g} CPUs")
            context = ray.init(**{k: v for k, v in kwargs.items() if v is not None})
            STARTED[:] = [True]
            if dashboard:
                log.info("Ray dashboard: http://%s", getattr(context, "dashboard_url", None) or f"{LOOPBACK}:8265")
        else:
            _join(ray, cluster["address"], float(cluster.get("connect_timeout_s") or 30.0),
                  {k: v for k, v in kwargs.items() if v is not None})
    if say_joined and UNSAID:
        say.info("%s", UNSAID.pop())
    _one_line_per_lost_node()
    res = _placement_group_resources() or ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def disconnect() -> None:
    """End the local cluster :func:`connect` started in this process; a joined cluster, or one started by
    someone else in this process (a test's), is left running. Called as a command ends: Ray's own exit hook does
    the same, after half a second's wait for log lines."""
    if STARTED or JOINED:  # a joined cluster's driver only disconnects: the cluster runs on
        import ray

        if JOINED:  # this command's actors end with it: warm workers take their place for the next command
            top_up(IDLE_AT_JOIN)
        ray.shutdown()
        STARTED.clear()
        JOINED.clear()
        UNSAID.clear()


def node_cpus() -> list[float] | None:
    """Each live node's CPUs on a cluster of several (None on one node, or inside a Tune trial's placement group)."""
    import ray
    from ray.util import get_current_placement_group

    if get_current_placement_group() is not None:
        return None
    cpus = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return cpus if len(cpus) > 1 else None


def top_up(known_idle: set[int] | None = None, spare: int = 1) -> int:
    """Ask each node of the warm local cluster on this machine for workers owned by no job, so that one per CPU plus
    ``spare`` (a coordinator's) stand idle with torch and the actors' code imported (:data:`WARM_PRELOAD`); returns how
    many were asked for. ``known_idle``: the pids of workers known to be idle and owned by no job (None: every idle
    worker counts).

    Ray starts such workers only for the first driver a raylet sees, and ends a command's own workers with it:
    without this, only the first command after ``up`` would find warm workers. The raylet's PrestartWorkers call
    (Ray's private API, over its token-authenticated channel) starts them; a raylet starts at most one per CPU at a
    time and drops the rest of a request, and ends idle workers beyond its ``num_workers_soft_limit`` (one per CPU
    and a spare on the warm cluster), so asking too many costs nothing. Where the API is missing nothing is asked,
    and commands start workers as Ray does by itself."""
    import ray

    try:
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    except ImportError:
        return 0
    asked, record = 0, nodes.read_record() or {}
    for node in ray.nodes():
        folder = _local_folder(node, record)
        if not node.get("Alive") or folder is None:  # nodes of this machine only: their workers can be counted
            continue
        idle = nodes.idle_workers(folder)
        want = int(node["Resources"].get("CPU", 0)) + spare - len(idle if known_idle is None else idle & known_idle)
        if want <= 0:
            continue
        channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
        try:
            node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
                node_manager_pb2.PrestartWorkersRequest(language=common_pb2.Language.PYTHON, num_workers=want),
                timeout=5.0)
            asked += want
        except Exception as e:  # noqa: BLE001 - a cold start next time, not a failed command
            log.debug("could not ask node %s for warm workers: %s", node.get("NodeID"), e)
        finally:
            channel.close()
    return asked


def keep_warm(temp_dir: str, count: int, wait_s: float) -> None:
    """Ask for workers (:func:`top_up`) until ``count`` of the node in ``temp_dir`` have torch loaded, at most ``wait_s``
    seconds (a raylet starts one per CPU at a time)."""
    deadline = time.monotonic() + wait_s
    while nodes.warm_workers(temp_dir) < count and time.monotonic() < deadline:
        top_up()  # asks for nothing while the node has an idle worker per CPU and a spare
        time.sleep(0.2)


def settle(wait_s: float = 60.0, quiet_s: float = 0.5) -> bool:
    """Wait (at most ``wait_s``) until the warm cluster's nodes on this machine hold their warm workers and those have
    stopped loading (no CPU used for ``quiet_s``): a benchmark times its next baseline on an idle machine. Whether
    they did."""
    record = nodes.read_record()
    if record is None:
        return False
    folders = nodes.folders(record)
    want = int(record.get("cpus", 1)) + 1
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        before = sum(nodes.busy_seconds(f) for f in folders)
        time.sleep(quiet_s)
        if nodes.warm_workers(record["temp_dir"]) >= want and sum(nodes.busy_seconds(f) for f in folders) == before:
            return True
    return False


def _local_folder(node: dict[str, Any], record: dict[str, Any]) -> str | None:
    """The Ray temp folder of ``node`` when it is one of the warm cluster's (``record``) nodes on this machine."""
    socket_path = str(node.get("ObjectStoreSocketName") or "")
    return next((t for t in nodes.folders(record) if socket_path.startswith(t.rstrip("/") + "/")), None)


def code_version() -> str:
    """A digest of the project's Python sources (sim/, agents/): a warm worker runs the code it imported at start-up."""
    digest = hashlib.sha256()
    for package in ("agents", "sim"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def up(num_cpus: float | None = None, num_gpus: float | None = None, wait_s: float = 120.0) -> dict[str, Any]:
    """Start the warm local cluster (``python -m sim.cluster up``) and return its record; one already up is kept.

    A ``ray start`` head on the loopback address, token authentication on (the token file made
    private first), no dashboard, its workers preloading torch and the actors' code; a first driver
    connects for a moment to ask for a worker per CPU and a spare (:func:`top_up`), and this waits (at
    most ``wait_s``) until they have imported torch, so the next command finds them ready. Each command
    that joins asks for as many again as it ends, so every command finds them."""
    current = status()
    if current["state"] == "up" and current["code"] == "current":
        return current
    down()  # a stale record, or a cluster of older code: replaced
    private_token()
    cpus = float(num_cpus if num_cpus is not None else os.cpu_count() or 1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               COLLABSIM_WARM_CLUSTER="1")  # its workers top it up (agents.runtime.preload)
    temp, address = nodes.start_node(head=True, num_cpus=num_cpus, num_gpus=num_gpus, env=env,
                                     system_config={"preload_python_modules": list(WARM_PRELOAD),
                                                    "prestart_worker_first_driver": False,
                                                    "num_workers_soft_limit": int(cpus) + 1, **INLINE_RESULTS,
                                                    **NO_TASK_EVENTS})
    nodes.write_record({"address": address, "temp_dir": temp, "nodes": [], "cpus": cpus, "code": code_version(),
                        "root": str(ROOT), "python": sys.executable, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    # Workers no job owns, one per CPU and a spare, each importing torch and the actors' code: the next command's.
    subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='auto', _temp_dir={temp!r}, "
                    "configure_logging=False, log_to_driver=False); from agents.runtime.cluster import keep_warm; "
                    f"keep_warm({temp!r}, {int(cpus) + 1}, {wait_s!r})"], env=env, capture_output=True, timeout=wait_s + 30)
    return status()


def down() -> int:
    """Stop the warm local cluster and the nodes added to it (by their processes' ids); how many processes ended."""
    record = nodes.read_record()
    if record is None:
        return 0
    ended = nodes.stop_nodes([*record.get("nodes", []), record["temp_dir"]])
    nodes.clear_record()
    return ended


def status() -> dict[str, Any]:
    """What is up: ``state`` (down | up | stale: recorded, its GCS silent), address, CPUs, nodes, warm workers."""
    record = nodes.read_record()
    if record is None:
        return {"state": "down"}
    alive = _answers(record.get("address", ""))
    extra = [t for t in record.get("nodes", []) if nodes.processes(t)]
    return {**record, "state": "up" if alive else "stale", "nodes": 1 + len(extra), "node_dirs": extra,
            "warm_workers": sum(nodes.warm_workers(t) for t in [record["temp_dir"], *extra]),
            "code": "current" if (record.get("code"), record.get("root"), record.get("python"))
            == (code_version(), str(ROOT), sys.executable) else "changed"}


def add_node(num_cpus: float) -> str:
    """Join one more ``ray start`` node of ``num_cpus`` CPUs on this machine to the warm cluster; its temp folder.

    Ray 2.60 turns token authentication on by itself for a head that finds a token, not for a node
    joining one: Ray's token-auth guide has every other node started with ``RAY_AUTH_MODE=token``."""
    record = nodes.read_record()
    if record is None:
        raise RuntimeError("no warm local cluster to add a node to: python -m sim.cluster up first")
    env = dict(os.environ, RAY_AUTH_MODE="token", COLLABSIM_WARM_CLUSTER="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    temp, _ = nodes.start_node(head=False, num_cpus=num_cpus, address=record["address"], env=env)
    nodes.write_record({**record, "nodes": [*record.get("nodes", []), temp]})
    return temp


@contextlib.contextmanager
def warm(num_cpus: float | None = None) -> Iterator[dict[str, Any]]:
    """The warm local cluster for the ``with`` block (e.g. a benchmark's commands); stopped after it if started here."""
    started = status()["state"] != "up"
    record = up(num_cpus)
    try:
        yield record
    finally:
        if started:
            down()


def joinable(cluster: dict[str, Any]) -> dict[str, Any] | None:
    """The warm cluster's record when a command with this ``cluster`` group should join it, else None (said why)."""
    record = nodes.read_record()
    if record is None:
        return None
    if not _answers(record.get("address", "")):
        say.info("the warm local cluster recorded in %s does not answer; starting a cluster of its own",
                 nodes.record_path())
        return None
    own = [k for k in OWN_CLUSTER_KEYS if cluster.get(k)]
    code = (record.get("code"), record.get("root"), record.get("python")) == (code_version(), str(ROOT), sys.executable)
    if own or not code:
        why = (f"cluster.{own[0]}={cluster[own[0]]} asks for a cluster of its own" if own else
               "its workers run other code than this command's (edited since `up`, or another checkout or Python)")
        say.info("a warm local cluster is up, but %s: starting one (python -m sim.cluster down && python -m "
                 "sim.cluster up refreshes it)", why)
        return None
    return record


def _join_warm(ray: Any, record: dict[str, Any]) -> None:
    """Join the warm cluster as Ray joins a local cluster it found (token authentication on); say so in one line."""
    quiet = logging.getLogger("ray._private.services")  # "Found multiple active Ray instances": other users' clusters
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        ray.init(address="auto", _temp_dir=record["temp_dir"], log_to_driver=True, configure_logging=False)
    finally:
        quiet.setLevel(level)
    JOINED[:] = [True]
    IDLE_AT_JOIN.clear()
    for folder in nodes.folders(record):
        IDLE_AT_JOIN.update(nodes.idle_workers(folder))
    UNSAID[:] = [f"joined the warm local Ray cluster at {record['address']} (python -m sim.cluster up; it keeps "
                 "running after this command)"]


def _one_line_per_lost_node() -> None:
    """Ray hands every driver a lost node's last 20 raylet log lines (a state dump); keep the first, which says what
    happened, so a node lost mid-run costs the researcher a line, not a screenful (the run's own lines say the rest).

    Ray prints them from two threads: raylet error messages through ``ray._private.worker.print_to_stdstream``, log
    lines through the stdstream dispatcher's ``ray_print_logs`` handler; both are wrapped (private names: if Ray
    moves them, its own print is left as it is)."""
    try:
        from ray._private import worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if callable(getattr(worker, "print_to_stdstream", None)):
        worker.print_to_stdstream = _shortened(worker.print_to_stdstream)
    with dispatcher._lock:
        dispatcher.handlers = [(name, _shortened(h) if name == "ray_print_logs" else h)
                               for name, h in dispatcher.handlers]


def _shortened(handle: Any) -> Any:
    """``handle`` (Ray's printer of a batch of lines from a process), printing only the first line of a raylet's."""
    if getattr(handle, "collabsim", False):
        return handle

    def handle_short(data, *args, **kwargs):
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and lines and (len(lines) > 1 or "\n" in lines[0]):
            data = {**data, "lines": [lines[0].split("\n", 1)[0]]}
        return handle(data, *args, **kwargs)

    handle_short.collabsim = True
    return handle_short


def _answers(address: str) -> bool:
    """Whether a GCS listens at ``host:port`` (a quick TCP probe)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except (OSError, ValueError):
        return False
    return True


def _join(ray: Any, address: str, timeout: float, kwargs: dict[str, Any]) -> None:
    """Join the cluster at ``address`` or fail within ``timeout`` seconds with one line (Ray alone retries for minutes)."""
    import math
    import socket

    from sim.core.config import check_address
    from sim.core.types import ConfigError

    target = check_address(address)  # the pre-run checks refused other forms already
    fix = "check cluster.address and that the cluster runs (`ray start --head` on its head node)"
    if target is not None:  # a quick TCP probe: unknown hosts and closed or unroutable ports fail here, in bounded time
        try:
            socket.create_connection(target, timeout=timeout).close()
        except OSError as e:
            why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
            raise ConfigError("cluster.address", f"cannot reach {address} within {timeout:g}s ({why}); {fix}") from None
    for knob in ("RAY_gcs_rpc_server_connect_timeout_s", "RAY_gcs_server_request_timeout_seconds"):
        os.environ.setdefault(knob, str(max(1, math.ceil(timeout))))  # Ray's own GCS waits, bounded the same way
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, ValueError) as e:
        lines = str(e).strip().splitlines()
        raise ConfigError("cluster.address", f"cannot join the Ray cluster at {address} "
                          f"({lines[0] if lines else type(e).__name__}); {fix}") from None


def _placement_group_resources() -> dict[str, float] | None:
    """Inside a placement group (a Tune trial): its bundles less what this process holds; None outside one.

    The run must be laid out on what its trial reserved, not on the cluster's free
    resources (other trials' reservations come and go); the trial's own bundle holds
    this process, so it is taken off.
    """
    import ray
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is None:
        return None
    held = ray.get_runtime_context().get_assigned_resources()
    total: dict[str, float] = {}
    for bundle in pg.bundle_specs:
        for k, v in bundle.items():
            total[k] = total.get(k, 0.0) + v
    return {k: max(0.0, v - held.get(k, 0.0)) for k, v in total.items()}
