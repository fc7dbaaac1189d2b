"""Ray itself: start a local cluster or join a running one, and end the one a command started.

A local cluster lives on the loopback address with Ray's token authentication on (its
default), no dashboard unless asked (``cluster.dashboard=true``), and workers that import
the actors' code as Ray starts them. Joining a cluster gives up within
``cluster.connect_timeout_s`` with one line. Inside a Tune trial the run is laid out on
what its placement group reserved.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


PRELOAD = ("agents.runtime.warm",)
"""Modules a local cluster's worker processes import as they start (Ray's ``preload_python_modules``): Ray starts a
worker per CPU at once, so torch and the actors' code are imported while the driver still builds the data, not
after it asks for its actors (about 1.5 s of a command's start on 2 cores)."""


STARTED: list[bool] = []
"""Non-empty once :func:`connect` has started a local cluster in this process (which :func:`disconnect` ends)."""


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


def connect(cluster: dict[str, Any], preload: tuple[str, ...] = PRELOAD) -> tuple[float, float]:
    """Start or join Ray per the ``cluster`` group; return the cluster's (CPUs, GPUs).

    A cluster started here preloads ``preload`` in its workers; one joined is left as it is.
    """
    import ray

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
                kwargs["_system_config"] = {"preload_python_modules": list(preload)}
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
    res = _placement_group_resources() or ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def disconnect() -> None:
    """End the local cluster :func:`connect` started in this process; a joined cluster, or one started by
    someone else in this process (a test's), is left running. Called as a command ends: Ray's own exit hook does
    the same, after half a second's wait for log lines."""
    if STARTED:
        import ray

        ray.shutdown()
        STARTED.clear()


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
