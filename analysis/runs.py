"""Find run directories, check that their runs finished, and read their tables.

A run directory holds ``metrics.parquet`` (and ledger, institutions, config.yaml); a
directory without one but with run directories directly below it (Hydra's multirun
layout: ``0/``, ``1/``, ...) stands for those. A ``status.json`` whose ``"state"`` is
not ``"complete"`` marks a directory as unfinished: it is left out unless asked for,
and the report says so. A directory without ``status.json`` (a compare's own directory,
whose runs keep theirs in ``runs/``; a run written before the engine recorded a status)
counts as complete, since tables are written only at the end, and the runs table says
what its files show.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

from sim.core.results import TableError, read_one, read_table

COMPLETE = "complete"
NO_STATUS = "no status.json"
"""The state of a directory that holds tables but no status.json; it counts as complete."""


class RunDirError(ValueError):
    """A path given as a run directory that is not one; the message is one line for the user."""


@dataclass(frozen=True)
class Results:
    """The tables of the runs taken into an analysis, and a record of every directory seen."""

    metrics: pd.DataFrame
    ledger: pd.DataFrame
    institutions: pd.DataFrame
    configs: dict[str, dict] = field(default_factory=dict)  # directory -> its config.yaml
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # directory, state, complete, included, schemes, seed_values
    tuned: pd.DataFrame = field(default_factory=pd.DataFrame)  # a tuned compare's tuned.csv: each scheme's chosen settings


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Resolve user paths to run directories (each holding metrics.parquet); raise RunDirError if one is not."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise RunDirError(f"{raw}: no such directory; give a run, compare or sweep directory (the path its command "
                              "printed last)")
        if (path / "metrics.parquet").is_file():
            found.append(path)
            continue
        children = sorted(p for p in path.iterdir() if (p / "metrics.parquet").is_file())
        if not children:
            raise RunDirError(f"{raw}: no metrics.parquet here or in its subdirectories; is it a run directory?")
        found.extend(children)
    unique = dict.fromkeys(p.resolve() for p in found)  # the same run given twice counts once
    return list(unique)


def run_state(run_dir: Path) -> str:
    """The state recorded in ``status.json``: "complete", another state, or why it cannot be read."""
    status = Path(run_dir) / "status.json"
    if not status.exists():
        return NO_STATUS
    try:
        state = json.loads(status.read_text()).get("state")
    except (OSError, ValueError, AttributeError):
        return "unreadable status.json"
    return str(state) if state else "status.json without a state"


def describe_state(run_dir: Path, state: str) -> str:
    """The state in plain words for the runs table: what status.json says, or what the files show without one."""
    if state != NO_STATUS:
        return state
    inner = sorted(Path(run_dir).glob("runs/*/status.json"))
    if not inner:
        return "no status.json; its tables are written, so it is read as complete (an older run, or a copy)"
    states = Counter(run_state(p.parent) for p in inner)
    done = states.pop(COMPLETE, 0)
    rest = "".join(f", {n} {s}" for s, n in sorted(states.items()))
    return f"compare of {len(inner)} runs: {done} complete{rest} (each run's status.json in runs/)"


def read_config(run_dir: Path) -> dict:
    """The run's resolved ``config.yaml`` as a dict ({} when missing or unreadable)."""
    path = Path(run_dir) / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def load_results(paths: Iterable[Path], *, include_incomplete: bool = False) -> Results:
    """Read every table of the given run directories; unfinished runs are left out unless asked for."""
    dirs = find_run_dirs(paths)
    records = []
    for d in dirs:
        state = run_state(d)
        complete = state in (COMPLETE, NO_STATUS)
        records.append({"directory": str(d), "state": describe_state(d, state), "complete": complete,
                        "included": complete or include_incomplete})
    runs = pd.DataFrame(records, columns=["directory", "state", "complete", "included"])
    taken = [Path(r["directory"]) for r in records if r["included"]]
    # drop_duplicates: two directories may hold the same run (a compare copied into a sweep).
    try:
        tables = {kind: read_table(kind, taken).drop_duplicates(ignore_index=True)
                  for kind in ("metrics", "ledger", "institutions")}
        contents = [read_one("metrics", Path(d) / "metrics.parquet", columns=["scheme", "seed"]) for d in dirs]
    except TableError as e:  # a damaged or foreign table: one line naming the file
        raise RunDirError(str(e)) from None
    from analysis.metrics import scheme_order  # scipy behind it: not for `python -m analysis --help`

    runs["schemes"] = [", ".join(scheme_order(c["scheme"].dropna())) for c in contents]
    runs["seed_values"] = [", ".join(str(v) for v in sorted(c["seed"].dropna().unique())) for c in contents]
    configs = {str(d): read_config(d) for d in taken}
    return Results(configs=configs, runs=runs, tuned=read_tuned(taken), **tables)


def read_tuned(dirs: Iterable[Path]) -> pd.DataFrame:
    """The settings tuned compares chose (their ``tuned.csv``), one row per scheme; empty when none was tuned."""
    found = [pd.read_csv(p) for d in dirs if (p := Path(d) / "tuned.csv").is_file()]
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame()
