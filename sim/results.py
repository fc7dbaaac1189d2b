"""The results schema: tidy tables that every run, compare and sweep writes.

A run directory holds:

- ``config.yaml``         the resolved config
- ``metrics.parquet``     one row per run x round x institution x metric (institution
                          ``global`` for the merged model on the global test set)
- ``ledger.parquet``      one row per run x round x institution: bytes, compute, time, epsilon
- ``institutions.parquet`` one row per run x institution: who they are and what they hold
- ``status.json``         ``{"state": "running" | "complete" | "failed", "rounds_done": k, ...}``
- ``checkpoints/``        the latest checkpoint (sim/checkpoint.py), for ``python -m sim resume=DIR``

Tables are written atomically (temporary file, then rename) so a reader never sees
half a table, and only once the run is complete; until then ``status.json`` says how far
it got. Analysis reads these files only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

KEYS = ("run_id", "scheme", "scenario", "seed")
"""Columns that identify a run in every table."""

METRICS_COLUMNS = {
    "run_id": "string",
    "scheme": "string",
    "scenario": "string",
    "seed": "int64",
    "round": "int64",  # 0 = before any training
    "institution": "string",  # institution name, or "global"
    "discipline": "string",  # the institution's discipline, "global" for the global row
    "metric": "string",  # accuracy | loss (on test data) | train_loss
    "value": "float64",
}

LEDGER_COLUMNS = {
    "run_id": "string",
    "scheme": "string",
    "scenario": "string",
    "seed": "int64",
    "round": "int64",
    "institution": "string",  # institution name, or "global" for the coordinator's own work
    "participated": "bool",  # in the cohort and its update arrived
    "bytes_up": "int64",  # bytes sent to the coordinator
    "bytes_down": "int64",  # bytes received from the coordinator
    "compute_seconds": "float64",  # measured wall time of local work (varies run to run)
    "simulated_seconds": "float64",  # deterministic: compute at the spec's cpus + transfer time
    "samples": "int64",  # training samples behind the update
    "epsilon": "float64",  # privacy spent so far; NaN when the scheme adds no noise
    "status": "string",  # ok | idle | unavailable | failed | crashed | timeout (sim/faults.py)
}

INSTITUTION_COLUMNS = {
    "run_id": "string",
    "scheme": "string",
    "scenario": "string",
    "seed": "int64",
    "institution": "string",
    "discipline": "string",
    "share": "float64",
    "train_samples": "int64",
    "test_samples": "int64",
    "label_skew": "float64",  # NaN = no label skew
    "feature_skew": "float64",
    "cpus": "float64",
    "gpus": "float64",
    "behaviour": "string",
    "availability": "float64",  # probability of taking part in a round (fault model)
    "failure_rate": "float64",  # probability its local step fails mid-round (fault model)
}

SCHEMAS = {"metrics": METRICS_COLUMNS, "ledger": LEDGER_COLUMNS, "institutions": INSTITUTION_COLUMNS}


def frame(kind: str, rows: Iterable[Mapping]) -> pd.DataFrame:
    """Build a table of ``kind`` with exactly the schema's columns and dtypes."""
    columns = SCHEMAS[kind]
    df = pd.DataFrame(list(rows), columns=list(columns))
    return df.astype(columns)


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write a parquet table atomically: a crash mid-write leaves the old file or none."""
    write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; remove the temporary on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes owner-only files; results are for everyone who may read the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_table(kind: str, run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Concatenate ``<kind>.parquet`` from several run directories (missing ones skipped)."""
    parts = [pd.read_parquet(p) for d in run_dirs if (p := Path(d) / f"{kind}.parquet").exists()]
    if not parts:
        return frame(kind, [])
    return pd.concat(parts, ignore_index=True)
