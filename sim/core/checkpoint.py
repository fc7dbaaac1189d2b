"""Checkpoints and the status file: a run that stops says how far it got and can be continued exactly.

In the run directory:

- ``status.json``: ``{"state": "running" | "complete" | "failed", "rounds_done": k, "rounds": n,
  "run_id": ..., "error": null | "one line", "institutions": null | [coalition]}``, written
  when the run starts, at every checkpoint and when it ends.
- ``checkpoints/latest.json`` points at ``checkpoints/round-KKKKK/``, which holds
  ``meta.json`` (round, simulated clock, run id), ``coordinator.npz`` (global and scheme
  state), ``institutions.npz`` (what each institution carries between rounds) and
  ``segments.json``, the ``checkpoints/rows-KKKKK/`` folders whose ``metrics.arrow`` and
  ``ledger.arrow`` (Arrow's file format; ``.parquet`` in older checkpoints, still read) hold the
  results rows so far, and whose ``idle.npz`` / ``idle.json`` hold the rounds' masks of
  institutions not picked (see :class:`Progress`): each checkpoint writes only what was added
  since the one before, so saving costs the same in round 5 as in round 500. It is written in a
  thread while the next rounds run (:func:`save`).

A checkpoint directory is written under a temporary name and renamed into place, then
the pointer is replaced the same way, so a crash at any moment leaves the previous
checkpoint whole. RNG states need no saving: every draw is seeded from (seed,
institution, round), so round k+1 draws the same numbers whether or not the run stopped
after round k. Nothing is pickled: arrays go to npz (read back with
``allow_pickle=False``), rows to Arrow files, the rest to JSON.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from sim.core.results import metric_blocks, metric_blocks_arrow, frame, idle_blocks, write_atomic, write_text
from sim.core.types import ConfigError, Snapshot, listing

FORMAT = 3  # bump when the layout changes; older checkpoints are then refused, not misread
# What reading a damaged checkpoint raises: OSError (missing file), ValueError (bad JSON, pyarrow's ArrowInvalid,
# a truncated npy), BadZipFile (a truncated npz), EOFError, and Key/Type/AttributeError for JSON of the wrong shape.
UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile)
DIR = "checkpoints"


PENDING_ROWS = 20_000  # rows held as dicts before they are framed into a table: bounds the driver's memory
PENDING_BLOCK_ROWS = 2_000_000  # metric rows held as arrays (17 bytes each) before they become a table


@dataclass
class Progress:
    """What a run has produced so far: its results tables, its simulated clock and the last round done.

    A round's rows wait as plain dicts until :data:`PENDING_ROWS` of a kind have gathered (or a
    checkpoint or the end of the run asks for them), then become one column-wise table: a
    table per round would cost a DataFrame's build (milliseconds) in every round, and dicts
    kept for a whole long run would grow the driver by megabytes per round. The ledger rows of
    institutions a round did not pick are all alike: each round keeps them as a bit mask over
    ``names`` (1.25 kB a round at 10,000 institutions), and they become rows only when the
    run's table is asked for, so no round and no checkpoint pays for the population. A
    checkpoint writes only the tables and masks added since the previous one.
    """

    metrics: list[pd.DataFrame] = field(default_factory=list)
    ledger: list[pd.DataFrame] = field(default_factory=list)
    sim_time: float = 0.0
    rounds_done: int = 0
    segments: list[str] = field(default_factory=list)  # checkpoint segments holding the tables saved so far
    saved: tuple[int, int, int] = (0, 0, 0)  # how many metrics tables, ledger tables and idle blocks those hold
    pending: dict[str, list[dict]] = field(default_factory=lambda: {"metrics": [], "ledger": []})
    names: pd.api.extensions.ExtensionArray | None = None  # every institution's name in scenario order (set by the engine)
    idle: list[tuple[dict, int, float, np.ndarray, float]] = field(default_factory=list)  # (keys, round, sim_time, packed mask, epsilon)
    # Metric rows kept as arrays (add_scores): (keys, round, who, which, values) with who indexing labels (the global
    # row, then every institution in scenario order) and disciplines, which indexing metric_names (set by the engine).
    blocks: list[tuple[dict, int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    block_rows: int = 0
    stored: Path | None = None  # the checkpoint folder holding the saved segments' rows (read back by table())
    labels: pd.api.extensions.ExtensionArray | None = None
    disciplines: pd.api.extensions.ExtensionArray | None = None
    metric_names: tuple[str, ...] = ()
    writing: Any = field(default=None, repr=False, compare=False)  # the checkpoint being written (save), if any

    def add(self, kind: str, rows: list[dict]) -> None:
        """Append one batch of ``kind`` rows ("metrics" or "ledger")."""
        if kind == "metrics" and self.blocks and rows:
            self.flush("metrics")  # rows kept as arrays came first
        self.pending[kind].extend(rows)
        if len(self.pending[kind]) >= PENDING_ROWS:
            self.flush(kind)

    def add_scores(self, keys: dict, round: int, who: np.ndarray, which: np.ndarray, values: np.ndarray) -> None:
        """Append metric rows kept as arrays (:func:`sim.core.results.metric_blocks`): ``who`` indexes :attr:`labels`,
        ``which`` :attr:`metric_names`; they become rows, after any dict rows before them, when a table is asked for."""
        if len(who):
            if self.pending["metrics"]:
                self.flush("metrics")
            self.blocks.append((keys, round, who, which, values))
            self.block_rows += len(who)
            if self.block_rows >= PENDING_BLOCK_ROWS:
                self.flush("metrics")

    def add_idle(self, keys: dict, round: int, sim_time: float, positions: np.ndarray, epsilon: float) -> None:
        """Note the ledger rows of a round's institutions that were not picked: ``positions`` in :attr:`names`,
        ascending (they become rows, :func:`sim.core.results.idle_blocks`, when the table is asked for)."""
        if len(positions):
            mask = np.zeros(len(self.names), dtype=bool)
            mask[np.asarray(positions, dtype=np.int64)] = True
            self.idle.append((keys, round, sim_time, np.packbits(mask), epsilon))

    def flush(self, kind: str | None = None) -> None:
        """Turn the waiting dict rows of ``kind`` (default: both kinds) into a table."""
        for k in (kind,) if kind else ("metrics", "ledger"):
            if self.pending[k]:
                getattr(self, k).append(frame(k, self.pending[k]))
            self.pending[k] = []
            if k == "metrics" and self.blocks:
                self.metrics.append(metric_blocks(self.blocks, self.labels, self.disciplines, self.metric_names))
                self.blocks, self.block_rows = [], 0

    def wait(self) -> None:
        """Wait until the checkpoint being written (:func:`save`), if any, is on disk; raise what its writing raised."""
        job, self.writing = self.writing, None
        if job is not None:
            job.result()  # raises what the writing raised

    def after(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the checkpoint being written (:func:`save`), if any, is on disk, without waiting for it
        here: then in the writer's thread, after it, so what ``fn`` says (a round's progress line) keeps its order
        behind the checkpoint round's own line. If the writing failed, ``fn`` does not run and :meth:`wait` raises."""
        job = self.writing
        if job is None or job.done():
            self.wait()
            fn()
            return

        def chained() -> None:
            job.result()  # done by now (one writer thread, in order); raises what the writing raised
            fn()

        self.writing = _writer().submit(chained)

    def table(self, kind: str) -> pd.DataFrame:
        """All rows of ``kind`` so far, in the schema's columns and dtypes, in round order (within a round: rows as
        they came, then the institutions not picked, in scenario order)."""
        self.wait()
        self.flush(kind)
        on_disk = [self.stored / seg for seg in self.segments] if self.stored is not None else []
        parts = [*(_read_rows(seg, kind) for seg in on_disk), *getattr(self, kind)]
        idle = [*(block for seg in on_disk for block in _load_idle(seg)), *self.idle] if kind == "ledger" else []
        if idle:
            n = len(self.names)
            parts.append(idle_blocks([(keys, r, t, np.flatnonzero(np.unpackbits(bits, count=n)), eps)
                                      for keys, r, t, bits, eps in idle], self.names))
        if not parts:
            return frame(kind, [])
        table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        return table.sort_values("round", kind="stable", ignore_index=True)


def write_status(run_dir: Path, state: str, *, run_id: str, rounds: int, rounds_done: int,
                 error: str | None = None, institutions: tuple[str, ...] | None = None) -> None:
    """Write ``status.json`` atomically."""
    status = {"state": state, "rounds_done": rounds_done, "rounds": rounds, "run_id": run_id, "error": error,
              "institutions": None if institutions is None else list(institutions),
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text(json.dumps(status, indent=1) + "\n", Path(run_dir) / "status.json")


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's ``status.json`` ({} when it has none or it cannot be read)."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def save(run_dir: Path, progress: Progress, snapshot: Snapshot, run_id: str,
         then: Callable[[], None] | None = None) -> Path:
    """Checkpoint ``progress`` and ``snapshot``: return the directory it will have once written.

    What the checkpoint holds is taken out of ``progress`` (and the snapshot's arrays copied) at
    once; the writing itself (tables built from the rows, Arrow and npz files, the renames) runs in
    a thread while the next rounds run, and ``then`` runs there once it is on disk. The previous
    checkpoint's writing ends first, and :meth:`Progress.wait` (called by :meth:`Progress.table`,
    and by the engine when a run stops) waits for this one and raises what it raised. The files
    land as before: a new directory under a temporary name, renamed, then the pointer replaced, so
    a run killed mid-write resumes from the checkpoint before.
    """
    progress.wait()
    root = Path(run_dir) / DIR
    final = root / f"round-{progress.rounds_done:05d}"
    names = sorted(snapshot.institutions)
    meta = {"format": FORMAT, "run_id": run_id, "round": progress.rounds_done, "sim_time": progress.sim_time,
            "institutions": names}
    arrays = {"coordinator.npz": _copied({"global": snapshot.global_state, "scheme": snapshot.scheme}),
              "institutions.npz": _copied({str(i): snapshot.institutions[n] for i, n in enumerate(names)})}
    # Results rows: only what came since the last checkpoint, as a segment of its own beside the older ones.
    segment = f"rows-{progress.rounds_done:05d}"
    (m0, l0, i0) = progress.saved
    rows = {"metrics": (progress.metrics[m0:], progress.pending["metrics"], progress.blocks),
            "ledger": (progress.ledger[l0:], progress.pending["ledger"], [])}
    tables = (progress.labels, progress.disciplines, progress.metric_names)
    idle, segments = progress.idle[i0:], [*progress.segments, segment]
    # What is saved lives on disk from now on (table() reads it back): the driver's memory does not grow with rounds.
    progress.segments, progress.stored, progress.saved = segments, root, (0, 0, 0)
    progress.metrics, progress.ledger, progress.idle = [], [], []
    progress.pending, progress.blocks, progress.block_rows = {"metrics": [], "ledger": []}, [], 0

    def write() -> None:
        tmp = root / f".{final.name}.tmp"
        for stale in (tmp, final):  # leftovers of a crash: never pointed at, safe to replace
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        for name, groups in arrays.items():
            _save_arrays(tmp / name, groups)
        seg_dir = root / segment
        shutil.rmtree(seg_dir, ignore_errors=True)
        seg_dir.mkdir(parents=True)
        for kind, (framed, dicts, blocks) in rows.items():
            _write_rows(seg_dir / f"{kind}.arrow", kind, [*framed, *([frame(kind, dicts)] if dicts else [])], blocks, tables)
        _save_idle(seg_dir, idle)
        (tmp / "segments.json").write_text(json.dumps(segments) + "\n")
        tmp.rename(final)
        write_text(json.dumps({"round": meta["round"], "dir": final.name}) + "\n", root / "latest.json")
        for old in root.glob("round-*"):  # only the latest is ever read
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for old in root.glob("rows-*"):  # segments of rounds after the latest checkpoint (a crash) are stale
            if old.name not in segments:
                shutil.rmtree(old, ignore_errors=True)
        if then is not None:
            then()

    progress.writing = _writer().submit(write)
    return final


_WRITER: list[concurrent.futures.ThreadPoolExecutor] = []


def _writer() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that writes every checkpoint of this process, made at the first. One thread, not one per
    checkpoint: each new thread may allocate from a malloc arena of its own, whose freed memory the C library keeps,
    and a driver writing from fresh threads grew by about 10 MiB every 10 rounds at 10,000 institutions."""
    if not _WRITER:
        _WRITER.append(concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="collabsim-checkpoint"))
    return _WRITER[0]


def stop_writing() -> None:
    """End the writer thread once what it was given is written (a command's end; a later checkpoint starts another)."""
    if _WRITER:
        _WRITER.pop().shutdown(wait=True)


def _copied(groups: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts of arrays, the arrays copied: the next round may change the originals while a checkpoint is
    written."""
    return {k: _copied(v) if isinstance(v, Mapping) else np.array(v, copy=True) for k, v in groups.items()}


def load(run_dir: Path, run_id: str) -> tuple[Progress, Snapshot] | None:
    """The latest checkpoint of ``run_dir`` (None if it has none); refuses one of another run."""
    root = Path(run_dir) / DIR
    if not (root / "latest.json").is_file():
        return None
    try:
        where = root / json.loads((root / "latest.json").read_text())["dir"]
        meta = json.loads((where / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ConfigError("resume", f"{run_dir}: the checkpoint has format {meta.get('format')} and this collabsim "
                              f"reads format {FORMAT}; delete {root} to run it again from the start")
        if meta.get("run_id") != run_id:
            raise ConfigError("resume", f"{run_dir}: the checkpoint belongs to run {meta.get('run_id')!r}, not to {run_id!r}")
        coordinator = _load_arrays(where / "coordinator.npz")
        carried = _load_arrays(where / "institutions.npz")
        segments = json.loads((where / "segments.json").read_text())
        for seg in segments:  # read back when the run's tables are asked for; checked now (their footers, the masks)
            for kind in ("metrics", "ledger"):
                _check_rows(root / seg, kind)
            _load_idle(root / seg)
        progress = Progress([], [], float(meta["sim_time"]), int(meta["round"]), list(segments), (0, 0, 0), stored=root)
        snapshot = Snapshot(coordinator.get("global", {}), coordinator.get("scheme", {}),
                            {n: carried.get(str(i), {}) for i, n in enumerate(meta["institutions"])})
    except ConfigError:
        raise
    except UNREADABLE as e:  # a damaged or truncated file, a missing segment, JSON of the wrong shape
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError("resume", f"{run_dir}: the checkpoint cannot be read ({type(e).__name__}"
                          f"{': ' + why[:200] if why else ''}); delete {root} to start over") from None
    return progress, snapshot


def clear(run_dir: Path) -> None:
    """Drop a run directory's checkpoints: once complete its tables hold everything; a fresh run starts clean."""
    shutil.rmtree(Path(run_dir) / DIR, ignore_errors=True)


@functools.cache
def _schemas(kind: str) -> tuple[pa.Schema, pa.Schema]:
    """A results table's Arrow schema as pandas converts it, and as a checkpoint segment stores it: every string
    column dictionary-encoded. A segment's rows repeat a few strings (run, scheme, metric, the institutions' names):
    at 10,000 institutions, 120,000 metric rows are 18 MB of strings, and 0.8 MB as dictionary indices, which are
    built from the kept arrays without a string per row and written (LZ4) in a fifth of the time (zstd, plain)."""
    plain = pa.Schema.from_pandas(frame(kind, []), preserve_index=False)
    coded = [pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if pa.types.is_large_string(f.type)
             or pa.types.is_string(f.type) else f for f in plain]
    return plain, pa.schema(coded, metadata=plain.metadata)


def _write_rows(path: Path, kind: str, frames: Sequence[pd.DataFrame], blocks: Sequence, tables: tuple) -> None:
    """A segment's rows of ``kind``, from its tables and its metric rows kept as arrays, as one Arrow file."""
    plain, stored = _schemas(kind)
    parts = [pa.Table.from_pandas(part, schema=plain, preserve_index=False).cast(stored) for part in frames]
    if blocks:
        parts.append(metric_blocks_arrow(blocks, *tables, stored))
    # One dictionary per column for the whole file, as Arrow's file format asks.
    table = pa.concat_tables(parts).unify_dictionaries().combine_chunks() if parts else stored.empty_table()
    feather.write_feather(table, path, compression="lz4")


def _read_rows(seg_dir: Path, kind: str) -> pd.DataFrame:
    """A segment's rows of ``kind`` in the table's own dtypes: ``KIND.arrow`` (Arrow's file format, strings
    dictionary-encoded or, as the previous version wrote them, plain), or ``KIND.parquet`` as older checkpoints
    wrote them."""
    arrow = seg_dir / f"{kind}.arrow"
    if arrow.is_file():
        return feather.read_table(arrow).cast(_schemas(kind)[0]).to_pandas()
    return pd.read_parquet(seg_dir / f"{kind}.parquet")


def _check_rows(seg_dir: Path, kind: str) -> None:
    """Read a segment's file footer (raises what :data:`UNREADABLE` lists for a truncated or missing file)."""
    arrow = seg_dir / f"{kind}.arrow"
    if arrow.is_file():
        with pa.memory_map(str(arrow)) as source:
            pa.ipc.open_file(source).schema
    else:
        pq.read_metadata(seg_dir / f"{kind}.parquet")


def _save_idle(seg_dir: Path, blocks: Sequence[tuple[dict, int, float, np.ndarray, float]]) -> None:
    """A segment's idle blocks: their masks and numbers in ``idle.npz``, their keys in ``idle.json``."""
    if not blocks:
        return
    (seg_dir / "idle.json").write_text(json.dumps([b[0] for b in blocks]) + "\n")
    arrays = {"masks": np.stack([b[3] for b in blocks]), "rounds": np.array([b[1] for b in blocks], dtype=np.int64),
              "sim_times": np.array([b[2] for b in blocks], dtype=np.float64),
              "epsilons": np.array([b[4] for b in blocks], dtype=np.float64)}
    write_atomic(seg_dir / "idle.npz", lambda tmp: _savez(tmp, arrays))


def _load_idle(seg_dir: Path) -> list[tuple[dict, int, float, np.ndarray, float]]:
    """The idle blocks :func:`_save_idle` wrote in a segment (none when it has no ``idle.npz``)."""
    if not (seg_dir / "idle.npz").is_file():
        return []
    keys = json.loads((seg_dir / "idle.json").read_text())
    with np.load(seg_dir / "idle.npz", allow_pickle=False) as npz:
        masks, rounds, times, eps = npz["masks"], npz["rounds"], npz["sim_times"], npz["epsilons"]
    if not (len(keys) == len(masks) == len(rounds) == len(times) == len(eps)):
        raise ValueError(f"{seg_dir.name}: idle blocks of unequal lengths")
    return [(dict(k), int(r), float(t), m, float(e)) for k, r, t, m, e in zip(keys, rounds, times, masks, eps)]


def _save_arrays(path: Path, groups: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """One npz holding every group's arrays under ``group/name``."""
    arrays = {f"{g}/{k}": np.asarray(v) for g, named in groups.items() for k, v in named.items()}
    write_atomic(path, lambda tmp: _savez(tmp, arrays))


def _savez(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to an exact path (given a name, savez would append '.npz')."""
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _load_arrays(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Groups of arrays back from :func:`_save_arrays` (no pickle)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            group, _, name = key.partition("/")
            out.setdefault(group, {})[name] = npz[key]
    return out


def resume_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that make ``resume=DIR`` write into DIR itself (no new output folder, no new .hydra/).

    A resumed run is the saved run: an override may only change how it executes (the keys of
    :data:`sim.core.config.EXECUTION_KEYS`: placement, the cluster, the backend, ...); any other is refused.
    """
    from sim.core.config import EXECUTION_KEYS

    resume = [a.partition("=")[2] for a in argv if a.startswith("resume=")]
    if not resume or resume[-1] in ("", "null"):
        return []
    if resume[-1].lower() in ("true", "false"):
        raise ConfigError("resume", "give the run directory to continue, e.g. resume=outputs/2025-01-31/12-00-00")
    others = [a for a in argv if not a.startswith(("resume=", "hydra.", "hydra/", "-"))
              and not _executes(a, EXECUTION_KEYS)]
    if others:
        raise ConfigError("resume", f"a resumed run keeps its saved config; drop {listing(map(repr, others))} "
                          f"(a resume may change only how it runs: {', '.join(EXECUTION_KEYS)})")
    path = str(Path(resume[-1]).expanduser().resolve())
    return [f"hydra.run.dir='{path}'" if "'" not in path else f"hydra.run.dir={path}", "hydra.output_subdir=null"]


def _executes(override: str, keys: Sequence[str]) -> bool:
    """Whether ``override`` sets one of ``keys`` (a group such as ``cluster`` and its keys, ``cluster.address``)."""
    key = override.partition("=")[0].lstrip("+~")
    return key in keys or any(key.startswith(k + ".") for k in keys)
