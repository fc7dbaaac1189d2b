"""The results schema: tidy tables that every run, compare and sweep writes.

A run directory holds:

- ``config.yaml``         the resolved config
- ``metrics.parquet``     one row per run x round x institution x metric (institution
                          ``global`` for the merged model on the global test set)
- ``ledger.parquet``      one row per run x round x institution: bytes, compute, time, epsilon
- ``institutions.parquet`` one row per run x institution: who they are and what they hold
- ``status.json``         ``{"state": "running" | "complete" | "failed", "rounds_done": k, ...}``
- ``checkpoints/``        the latest checkpoint (sim/core/checkpoint.py), for ``python -m sim resume=DIR``

Tables are written atomically (temporary file, then rename) so a reader never sees
half a table, and only once the run is complete; until then ``status.json`` says how far
it got. Analysis reads these files only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from sim.core.faults import IDLE

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
    "metric": "string",  # accuracy | loss (test split) | val_accuracy | val_loss (validation split) | train_loss
    #                      | backdoor_success (global row, with a data_poisoning institution: attack success rate)
    "value": "float64",
    "selected": "bool",  # the round results.select picked for this institution (select_rounds); analysis reports it
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
    "sim_compute_seconds": "float64",  # the compute part of simulated_seconds (device time a cost model prices)
    "sim_time": "float64",  # simulated seconds elapsed since the start of the run at the end of this round (same for all rows)
    # Compute sharing (scheme=compute_share; under every other scheme: own name, 0, 0, 0, simulated_seconds):
    "trained_by": "string",  # institution whose compute trained this update: its own name, or its compute_share giver
    "data_bytes": "int64",  # raw training data sent to a partner to train on (the round it moves; not in bytes_up)
    "compute_given_seconds": "float64",  # simulated device seconds spent training partners' data (part of sim_compute_seconds)
    "compute_taken_seconds": "float64",  # simulated device seconds a partner spent on this row's data (booked on the partner's row)
    "solo_seconds": "float64",  # simulated_seconds this row would take without compute sharing (the time saved is the difference)
    "samples": "int64",  # training samples behind the update
    "epsilon": "float64",  # privacy spent so far; NaN when the scheme adds no noise
    "staleness": "float64",  # asynchronous schemes: server steps between the dispatch and the merge of the update merged this round; NaN otherwise
    "status": "string",  # ok | idle | unavailable | failed | crashed | timeout | late (sim/core/faults.py)
    "work_done": "float64",  # fraction of its planned local work behind the update that arrived (< 1: a partial straggler; 0 if none arrived)
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
    "classes": "Int64",  # classes in its training split (1: its accuracy is over one class); <NA> where not recorded
    "label_skew": "float64",  # NaN = no label skew
    "feature_skew": "float64",
    "cpus": "float64",
    "gpus": "float64",
    "behaviour": "string",
    "availability": "float64",  # probability of taking part in a round (fault model)
    "failure_rate": "float64",  # probability its local step fails mid-round (fault model)
    "speed": "float64",  # compute speed factor on top of cpus/gpus (simulated clock)
}

SCHEMAS = {"metrics": METRICS_COLUMNS, "ledger": LEDGER_COLUMNS, "institutions": INSTITUTION_COLUMNS}
DESIGN_FILE = "design.json"
"""A sensitivity sweep's design in its directory (sim/sweep/design.py writes it, analysis/sensitivity.py reads it)."""
DESIGN_ROW = "design_row"
"""The trials table's column placing each trial in its design (the order the Sobol' estimators pair rows by)."""
REQUIRED = {"metrics": (*KEYS, "round", "institution", "metric", "value"), "ledger": (*KEYS, "round", "institution"),
            "institutions": (*KEYS, "institution")}
"""Columns a file must hold to be read as that table (later schema additions may be missing from older runs)."""


SELECT_RULES = ("last", "best_val")
"""Model-selection rules (``results.select``): the last round, or each institution's round of best validation accuracy."""


ZERO_IF_MISSING = {"data_bytes"}
"""Counts a row may leave out, read as 0: rows written before compute sharing moved data (tools' and tests' own)."""


def frame(kind: str, rows: Iterable[Mapping]) -> pd.DataFrame:
    """Build a table of ``kind`` with exactly the schema's columns and dtypes (a flag a row leaves out is False,
    a count of :data:`ZERO_IF_MISSING` 0)."""
    columns = SCHEMAS[kind]
    rows = rows if isinstance(rows, list) else list(rows)
    data = {}
    for name, dtype in columns.items():  # column by column: a quarter of the time of a frame of dicts then astype
        values = [row.get(name) for row in rows]
        if dtype == "bool" or name in ZERO_IF_MISSING:
            fill = False if dtype == "bool" else 0
            values = [fill if v is None or v != v else v for v in values]  # v != v: NaN
        data[name] = pd.array(values, dtype=dtype) if dtype in ("string", "Int64") else np.array(values, dtype=dtype)
    return pd.DataFrame(data, columns=list(columns))


def idle_blocks(blocks: Sequence[tuple[Mapping, int, float, np.ndarray, float]],
                names: pd.api.extensions.ExtensionArray) -> pd.DataFrame:
    """The ledger rows of institutions rounds did not pick, built as columns, as one table in the blocks' order:
    ``(keys, round, sim_time, positions, epsilon)`` each, ``positions`` indexing ``names`` (a pandas string array).
    Each is not a participant, moved nothing, took no time and spent ``epsilon`` (the round's client-level one, NaN
    without noise). About 2 ms for 10,000 rows, where :func:`frame` of as many dicts takes 50; one table's build for
    a run's idle rows, not one per round."""
    keys = blocks[0][0]
    if any(block[0] != keys for block in blocks[1:]):  # rows of several runs: one table per block
        return pd.concat([idle_blocks([block], names) for block in blocks], ignore_index=True)
    counts = [len(block[3]) for block in blocks]
    n = sum(counts)
    names = names.take(np.concatenate([np.asarray(block[3], dtype=np.int64) for block in blocks]))
    every = np.zeros(n, dtype=np.int64)

    def per_row(i: int, dtype: type) -> np.ndarray:
        return np.repeat(np.array([block[i] for block in blocks], dtype=dtype), counts)

    def same(value: object, dtype: str) -> pd.api.extensions.ExtensionArray:
        return pd.array([value], dtype=dtype).take(every)  # one value n times, without n Python objects

    columns: dict = {k: same(v, LEDGER_COLUMNS[k]) for k, v in keys.items()} | {
        "round": per_row(1, np.int64), "institution": names, "participated": np.zeros(n, dtype=bool),
        "sim_time": per_row(2, np.float64), "trained_by": names,
        "epsilon": per_row(4, np.float64), "staleness": np.full(n, np.nan), "status": same(IDLE, "string")}
    columns |= {k: np.zeros(n, dtype=dtype) for k, dtype in LEDGER_COLUMNS.items() if k not in columns}
    return pd.DataFrame(columns, columns=list(LEDGER_COLUMNS))  # every column already has the schema's dtype


def metric_blocks(blocks: Sequence[tuple[Mapping, int, np.ndarray, np.ndarray, np.ndarray]],
                  labels: pd.api.extensions.ExtensionArray, disciplines: pd.api.extensions.ExtensionArray,
                  metrics: Sequence[str]) -> pd.DataFrame:
    """Metric rows kept as arrays, built as one table: ``(keys, round, who, which, values)`` each, ``who`` indexing
    ``labels``/``disciplines`` (pandas string arrays: the global row and the institutions), ``which`` indexing
    ``metrics``. A round of 10,000 institutions' scores is three small arrays, where dict rows cost more than the
    scoring; the table is built once, when asked for (a checkpoint, the end of the run)."""
    if not _one_run(blocks):  # rows of several runs: one table per run's blocks
        return pd.concat([metric_blocks([b], labels, disciplines, metrics) for b in blocks], ignore_index=True)
    columns = {k: pd.array(v[0], dtype="string").take(v[1]) if isinstance(v, tuple) else v
               for k, v in _block_columns(blocks, labels, disciplines, metrics).items()}
    return pd.DataFrame(columns, columns=list(METRICS_COLUMNS))


def metric_blocks_arrow(blocks: Sequence[tuple[Mapping, int, np.ndarray, np.ndarray, np.ndarray]],
                        labels: pd.api.extensions.ExtensionArray, disciplines: pd.api.extensions.ExtensionArray,
                        metrics: Sequence[str], schema: pa.Schema) -> pa.Table:
    """:func:`metric_blocks` built as an Arrow table of ``schema`` (a metrics table's, as pandas converts it, or with
    string columns dictionary-encoded): a string column is its few distinct values and each row's index into them,
    never one Python string per row (at 10,000 institutions a checkpoint's 120,000 rows: pandas' conversion of them
    took most of its writing)."""
    if not _one_run(blocks):  # rows of several runs: one table per run's blocks
        return pa.concat_tables([metric_blocks_arrow([b], labels, disciplines, metrics, schema) for b in blocks])
    columns = _block_columns(blocks, labels, disciplines, metrics)
    return pa.table([_arrow_column(columns[f.name], f.type) for f in schema], schema=schema)


def _arrow_column(column: np.ndarray | tuple[Sequence[str], np.ndarray], type: pa.DataType) -> pa.Array:
    """One column of :func:`_block_columns` as an Arrow array of ``type``."""
    if not isinstance(column, tuple):
        return pa.array(column).cast(type)
    values, index = column
    if pa.types.is_dictionary(type):  # each value once in the dictionary (the disciplines repeat)
        codes, distinct = pd.factorize(values if isinstance(values, pd.api.extensions.ExtensionArray)
                                       else np.asarray(values, dtype=object))
        return pa.DictionaryArray.from_arrays(pa.array(codes.astype(type.index_type.to_pandas_dtype())[index]),
                                              pa.array(distinct, type=type.value_type))
    return pa.array(values, type=type).take(pa.array(index))


def _one_run(blocks: Sequence[tuple[Mapping, int, np.ndarray, np.ndarray, np.ndarray]]) -> bool:
    """Whether metric blocks all carry the same keys (run id, scheme, scenario, seed)."""
    return all(block[0] == blocks[0][0] for block in blocks[1:])


def _block_columns(blocks: Sequence[tuple[Mapping, int, np.ndarray, np.ndarray, np.ndarray]],
                   labels: Sequence[str], disciplines: Sequence[str], metrics: Sequence[str]
                   ) -> dict[str, np.ndarray | tuple[Sequence[str], np.ndarray]]:
    """The metrics table's columns of one run's blocks (:func:`metric_blocks`): numbers as arrays, a string column as
    (its values, each row's index into them), for the caller to take in pandas or in Arrow."""
    keys = blocks[0][0]
    counts = [len(block[2]) for block in blocks]
    n = sum(counts)
    who = np.concatenate([block[2] for block in blocks]).astype(np.int64, copy=False)
    which = np.concatenate([block[3] for block in blocks]).astype(np.int64, copy=False)
    every = np.zeros(n, dtype=np.int64)
    columns = {k: ([v], every) if METRICS_COLUMNS[k] == "string" else np.full(n, v, dtype=METRICS_COLUMNS[k])
               for k, v in keys.items()}
    return columns | {"round": np.repeat(np.array([block[1] for block in blocks], dtype=np.int64), counts),
                      "institution": (labels, who), "discipline": (disciplines, who), "metric": (list(metrics), which),
                      "value": np.concatenate([block[4] for block in blocks]).astype(np.float64, copy=False),
                      "selected": np.zeros(n, dtype=bool)}


def select_rounds(metrics: pd.DataFrame, rule: str) -> pd.Series:
    """The ``selected`` column for one run's metrics: True on the rows of the round ``rule`` picks per institution.

    ``last``: the last scored round. ``best_val``: the round whose model scores the highest
    validation accuracy for that institution (the global row: on the union of the validation
    splits), ties going to the lower validation loss, then to the earlier round: early
    stopping on each institution's own validation split, applied alike to every scheme
    (under ``isolated`` it stops each institution's own training; under a federated scheme
    each institution keeps the round's model that serves it best). Test data never choose.
    """
    if rule not in SELECT_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {', '.join(SELECT_RULES)}")
    keys = ["run_id", "institution"]
    scored = metrics[metrics["metric"] == "accuracy"][[*keys, "round"]]
    if rule == "last" or not (metrics["metric"] == "val_accuracy").any():
        pick = scored.groupby(keys, as_index=False)["round"].max()
    else:
        val = metrics[metrics["metric"].isin(["val_accuracy", "val_loss"])]
        wide = val.pivot_table(index=[*keys, "round"], columns="metric", values="value", aggfunc="first").reset_index()
        if "val_loss" not in wide:
            wide["val_loss"] = 0.0
        wide = wide.sort_values([*keys, "val_accuracy", "val_loss", "round"], ascending=[True, True, False, True, True])
        pick = wide.drop_duplicates(keys)[[*keys, "round"]]
        last = scored.groupby(keys, as_index=False)["round"].max()  # who has no validation rows keeps its last round
        unvalidated = last.merge(pick[keys], on=keys, how="left", indicator=True)["_merge"] == "left_only"
        pick = pd.concat([pick, last[unvalidated.to_numpy()]], ignore_index=True)
    chosen = metrics[keys + ["round"]].merge(pick.assign(_pick=True), on=[*keys, "round"], how="left")["_pick"]
    return pd.Series(chosen.notna().to_numpy(), index=metrics.index, name="selected")


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write a parquet table atomically: a crash mid-write leaves the old file or none."""
    write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV table (summary.csv, trials.csv) atomically."""
    write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def _file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename onto ``path``; remove the temporary on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename: a power cut leaves the old file, never an empty new one
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp makes owner-only files; results are for everyone who may read the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist a rename (best effort: some file systems cannot fsync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TableError(ValueError):
    """A results table that cannot be read or is not one of ours; the message is one line naming the file."""


def read_one(kind: str, path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """One ``<kind>.parquet`` file, checked readable and holding the schema's columns (raises TableError)."""
    try:
        df = pd.read_parquet(path, columns=columns)
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError, a missing column: all mean a bad file
        lines = str(e).strip().splitlines()
        raise TableError(f"{path}: cannot be read as a {kind} table ({type(e).__name__}"
                         f"{': ' + lines[0][:160] if lines else ''}); rerun the run or leave the file out") from None
    missing = [c for c in (columns or REQUIRED[kind]) if c not in df.columns]
    if missing:
        raise TableError(f"{path}: not a collabsim {kind} table (no column {', '.join(missing[:3])}); "
                         "rerun the run or leave the file out")
    return df


def read_table(kind: str, run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Concatenate ``<kind>.parquet`` from several run directories (missing ones skipped)."""
    parts = [read_one(kind, p) for d in run_dirs if (p := Path(d) / f"{kind}.parquet").exists()]
    if not parts:
        return frame(kind, [])
    return pd.concat(parts, ignore_index=True)
