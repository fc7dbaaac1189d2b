"""Run directories are never clobbered: refuse a used one, lock the one in use, mark the ones we made.

A new run, compare or sweep writes into a directory that holds nothing but what Hydra
itself put there (``.hydra/`` and the ``<job>.log`` file) — anything else, a run of
ours or a user's own file, is refused with one line unless ``overwrite=true``. Resuming
(``resume=DIR``) uses the existing directory by design. While a run writes, the directory
holds ``.collabsim.lock`` (created with O_EXCL, holding the owner's pid and host), so two
runs never share one; a lock whose pid is dead on this host is stale and is taken over
with a warning. ``collabsim-run.json`` (a run) and ``collabsim-sweep.json`` (a sweep)
record who made the directory and, for a run, the config its run id was made from, so
a resume can tell an edited config.yaml and a sweep folder from elsewhere.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Mapping

from sim.core.types import ConfigError

log = logging.getLogger("collabsim")
LOCK = ".collabsim.lock"
RUN_MARKER = "collabsim-run.json"
SWEEP_MARKER = "collabsim-sweep.json"
COMPARE_MARKER = "collabsim-compare.json"
KEY = "hydra.run.dir"  # the key a user changes to pick another directory
HYDRA_OWN = (".hydra",)  # Hydra writes these (and <job>.log) before our code runs
# What our commands leave in a directory; removed (only these) when overwrite=true replaces it.
OURS = ("config.yaml", "status.json", "metrics.parquet", "ledger.parquet", "institutions.parquet", "checkpoints",
        "summary.csv", "trials.csv", "trials.parquet", "runs", "trials", "tune", "report.html", "tables",
        "mlruns", "tensorboard", "tracking.json",  # tracking's default folders (sim/tracking.py)
        RUN_MARKER, SWEEP_MARKER, COMPARE_MARKER)


def _foreign(path: Path) -> list[str]:
    """Names in ``path`` that neither Hydra nor a lock put there, sorted (ours first)."""
    if not path.is_dir():
        return []
    names = [p.name for p in path.iterdir()
             if p.name not in HYDRA_OWN and p.name != LOCK and not (p.suffix == ".log" and p.is_file())]
    return sorted(names, key=lambda n: (n not in OURS, n))


def check_fresh(path: str | Path, overwrite: bool = False, key: str = KEY) -> None:
    """Refuse ``path`` if it already holds a run or other files (ConfigError on ``key``), unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} is a file, not a directory; choose another {key}")
    found = _foreign(path)
    if refused(path):  # a run refused before its first round holds nothing worth keeping: the corrected command may go
        found = [n for n in found if n not in OURS]
    if overwrite or not found:
        return
    if found[0] in OURS:
        raise ConfigError(key, f"{path} already holds a run; pass overwrite=true to replace it or choose another {key}")
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    raise ConfigError(key, f"{path} already holds files that are not a run ({shown}); pass overwrite=true to "
                      f"write beside them or choose another {key}")


def refused(path: str | Path) -> bool:
    """Whether ``path`` holds a run that bad input stopped before it finished a round (status failed, ConfigError)."""
    status = _read_json(Path(path) / "status.json")
    return (status.get("state") == "failed" and status.get("rounds_done") == 0
            and str(status.get("error") or "").startswith("ConfigError") and not (Path(path) / "checkpoints").exists())


def clear(path: str | Path) -> None:
    """Remove what an earlier run of ours left in ``path`` (overwrite=true); a user's other files stay."""
    for name in OURS:
        p = Path(path) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)


def argv_dir(argv: list[str]) -> tuple[str | None, bool, bool]:
    """(hydra.run.dir, overwrite, resuming) as the command line sets them; the dir is None if not given literally."""
    values: dict[str, str] = {}
    for a in argv:
        key, sep, value = a.lstrip("+").partition("=")
        if sep:
            values[key] = value.strip().strip("'\"")
    where = values.get("hydra.run.dir")
    overwrite = values.get("overwrite", "false").lower() == "true"
    resuming = values.get("resume", "null").lower() not in ("null", "false", "")
    return (None if not where or "${" in where else where), overwrite, resuming


def check_argv(argv: list[str]) -> None:
    """Before Hydra writes its .hydra/ folder: refuse a literal ``hydra.run.dir=DIR`` that already holds a run."""
    where, overwrite, resuming = argv_dir(argv)
    if where is not None and not resuming:
        check_fresh(Path(where).expanduser(), overwrite)


# ---- the lock ------------------------------------------------------------------------------------

def _owner() -> dict[str, Any]:
    """Who holds a lock or made a directory: pid, host, user, when."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): the uid says who
        user = str(os.getuid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "user": user,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is another user's
        return True
    return True


def acquire(path: str | Path, key: str = KEY) -> Path:
    """Create ``path``/.collabsim.lock (O_EXCL); take over a stale one; ConfigError if a live run holds it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock, me = path / LOCK, _owner()
    for _ in range(3):  # a stale lock is removed and the O_EXCL create tried again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_json(lock)
            pid, host = holder.get("pid"), holder.get("host")
            if not isinstance(pid, int) or host != me["host"] or (pid != me["pid"] and _alive(pid)):
                who = f"pid {pid} on {host}" if isinstance(pid, int) else "a run that is still starting"
                raise ConfigError(key, f"{path} is in use by another run ({who}); wait for it or choose another "
                                  f"{key} (delete {lock} if that run is gone)") from None
            if pid != me["pid"]:
                log.warning("%s: taking over the lock of pid %d on %s, which is no longer running", path, pid, host)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise ConfigError(key, f"{path}: cannot take {LOCK}; another run keeps taking it")


def release(path: str | Path) -> None:
    """Remove ``path``/.collabsim.lock if this process holds it."""
    lock = Path(path) / LOCK
    if _read_json(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


# ---- markers -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` ({} when missing, unreadable or not an object)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(path: str | Path, name: str, **extra: Any) -> None:
    """Record who made the directory (and ``extra``, e.g. the run's config) in ``path``/``name``."""
    from sim.core.results import write_text

    write_text(json.dumps(_owner() | extra, indent=1, default=str) + "\n", Path(path) / name)


def read_marker(path: str | Path, name: str) -> dict[str, Any]:
    """The marker ``name`` of ``path`` ({} when there is none)."""
    return _read_json(Path(path) / name)


def made_here(marker: Mapping[str, Any]) -> bool:
    """Whether a marker was written by this user on this host."""
    me = _owner()
    return bool(marker) and marker.get("user") == me["user"] and marker.get("host") == me["host"]


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out = []
        for k in sorted(set(before) | set(after), key=str):
            out += changed_keys(before.get(k), after.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if json.dumps(before, default=str) == json.dumps(after, default=str) else [prefix or "(the config)"]
