"""Ray nodes started with ``ray start`` on this machine: the warm local cluster and the rehearsal's extra nodes.

Every node gets a Ray temporary folder of its own (``/tmp/collabsim-ray-XXXX``, made private by
``mkdtemp``): its processes carry that folder on their command line, so they are found, counted and
stopped by their ids, never by name (``ray stop`` would end every Ray process of the user on the
machine, other commands' and other users' clusters included). The warm cluster is written down in
``~/.ray/collabsim-cluster.json`` (readable by its owner alone, beside Ray's token), which commands
read to join it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECORD = "collabsim-cluster.json"  # in ~/.ray, beside Ray's auth_token
GRACE_S = 5.0  # SIGTERM, then SIGKILL for what still runs after this long (raylet first, GCS last, as `ray stop` does)


def record_path() -> Path:
    """Where the warm cluster is written down (``~/.ray/collabsim-cluster.json``)."""
    return Path.home() / ".ray" / RECORD


def read_record() -> dict[str, Any] | None:
    """The warm cluster's record, or None when there is none (or it cannot be read)."""
    try:
        record = json.loads(record_path().read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("temp_dir"), str) else None


def write_record(record: dict[str, Any]) -> None:
    """Write the record readable by its owner alone (it names the cluster a token lets one run code on)."""
    path = record_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def clear_record() -> None:
    """Forget the warm cluster."""
    record_path().unlink(missing_ok=True)


def folders(record: dict[str, Any]) -> list[str]:
    """The Ray temp folders of the warm cluster's nodes on this machine (``record``), the head's first."""
    return [t for t in [record.get("temp_dir"), *record.get("nodes", [])] if t]


def ray_cli() -> str:
    """The ``ray`` command of this Python environment."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def start_node(*, head: bool, num_cpus: float | None = None, num_gpus: float | None = None,
               address: str | None = None, env: dict[str, str] | None = None,
               system_config: dict[str, Any] | None = None, timeout_s: float = 180.0) -> tuple[str, str]:
    """``ray start`` a head (``head=True``) or a node joining ``address``; returns (its temp folder, the GCS address).

    The node address is the loopback one (Ray 2.60 still listens on every interface; the token
    guards it), no dashboard, no usage statistics. Raises RuntimeError with Ray's last line if it fails.
    """
    temp = tempfile.mkdtemp(prefix="collabsim-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    argv = [ray_cli(), "start", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    if head:
        argv += ["--head", "--port=0", "--include-dashboard=false"]
        if system_config:
            argv.append("--system-config=" + json.dumps(system_config))
    else:
        argv.append(f"--address={address}")
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus:g}")
    if num_gpus is not None:
        argv.append(f"--num-gpus={num_gpus:g}")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    gcs = Path(temp, "ray_current_cluster")
    if done.returncode != 0 or not gcs.is_file():
        stop_nodes([temp])
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"ray start failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return temp, gcs.read_text().strip()


def processes(temp_dir: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process of the node whose Ray temp folder is ``temp_dir``, and their children.

    Ray's workers retitle themselves (``ray::IDLE``), so they are found as the raylet's children."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    mark = temp_dir.rstrip("/")
    rows = []
    for line in out.splitlines():
        pid, ppid, *rest = line.split(None, 2)
        rows.append((int(pid), int(ppid), rest[0] if rest else ""))
    found = {pid for pid, _, args in rows
             if (f"{mark}/" in args or f"={mark} " in args or args.endswith(f"={mark}")) and pid != os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, ppid, _ in rows if ppid in found} - found
        found |= more
        grew = bool(more)
    return [(pid, args) for pid, _, args in rows if pid in found]


def workers(temp_dir: str) -> list[tuple[int, str]]:
    """(pid, command line) of the node's Python worker processes: idle (``ray::IDLE``), an actor's or a task's
    (``ray::NAME``), or still starting (``default_worker.py``); not the raylet (whose command line names
    ``default_worker.py`` too) nor Ray's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``)."""
    return [(pid, args) for pid, args in processes(temp_dir) if _stage(args) == 1
            and ("default_worker.py" in args or (args.startswith("ray::") and not args.split()[0].endswith("Agent")))]


def warm_workers(temp_dir: str) -> int:
    """Idle-or-busy Python worker processes of the node that have torch loaded (Linux; 0 where /proc is absent)."""
    count = 0
    for pid, _ in workers(temp_dir):
        try:
            count += "libtorch" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            pass
    return count


def busy_seconds(temp_dir: str) -> float:
    """CPU seconds the node's worker processes have used so far (Linux; 0 where /proc is absent)."""
    total = 0
    for pid, _ in workers(temp_dir):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def idle_workers(temp_dir: str) -> set[int]:
    """Process ids of the node's workers that no actor or task holds: idle (``ray::IDLE``) or still starting."""
    return {pid for pid, args in workers(temp_dir) if args.startswith("ray::IDLE") or "default_worker.py" in args}


def stop_nodes(temp_dirs: list[str]) -> int:
    """Stop every process of these nodes by id (raylets first, GCS last), remove their folders; returns how many."""
    procs = [p for t in temp_dirs for p in processes(t)]
    for stage in (0, 1, 2):
        pids = [pid for pid, args in procs if _stage(args) == stage]
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S / 3
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        _signal([p for p in pids if _alive(p)], signal.SIGKILL)
    for t in temp_dirs:
        shutil.rmtree(t, ignore_errors=True)
    return len(procs)


def kill_raylet(temp_dir: str) -> int | None:
    """SIGKILL the raylet of the node in ``temp_dir`` (a node lost abruptly); its pid, or None when it has none."""
    for pid, args in processes(temp_dir):
        if _stage(args) == 0:
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


def _stage(args: str) -> int:
    """0 for a raylet, 2 for the GCS server, 1 for the rest: the order a node is stopped in."""
    exe = args.split()[0] if args else ""
    return 0 if exe.endswith("/raylet") else 2 if exe.endswith("/gcs_server") else 1


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
