"""A user's own table: one CSV or Parquet file, one row per sample.

``label_column`` holds the class (any type; mapped to 0..C-1 in sorted order over the
whole file). ``feature_columns`` lists the inputs (null = every other numeric column).
With ``partition: natural`` institution k gets the rows whose ``institution_column``
equals its name, and the file, not the scenario shares, decides sizes;
``sites_from_table`` lists those institutions so a scenario can be built straight from
the file. ``split_column`` (values train/test) fixes the split; without it each
institution holds out ``test_fraction`` of its rows. Features are standardised with the
mean and standard deviation of all institutions' training rows (never test rows).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sim.core.data import checks
from sim.core.data.partition import (
    MIN_TEST, MIN_TRAIN, PARTITION, SMOKE, SMOKE_SAMPLES, SPLIT, Pool, check_partition, check_sizes, natural, num_test,
    partition, smallest_workable, smoke_size, split_train_test, stream,
)
from sim.core.types import ConfigError, Scenario

DEFAULTS = {
    "name": "table",
    "path": None,
    "label_column": "label",
    "institution_column": None,
    "discipline_column": None,
    "split_column": None,
    "feature_columns": None,
    "partition": "iid",
    "test_fraction": 0.2,
    "dirichlet_alpha": 0.5,
    "quantity_exponent": 1.5,
    "views": None,  # sim.core.data.views: {institution: [columns]} splits the features between institutions
    "label_holder": None,
    "overlap": 1.0,
    "entity_column": None,
}
NO_DISCIPLINE = "unspecified"  # discipline of every site when data.discipline_column is null
_ROLES = ("label_column", "institution_column", "discipline_column", "split_column")


def _path(data: Mapping) -> Path:
    """The file behind data.path, checked to exist and to be CSV, TSV or Parquet."""
    raw = data["path"]
    if raw in (None, "", "???"):
        raise ConfigError("data.path", "no file given; set data.path=/path/to/your.csv (or .parquet)")
    path = Path(str(raw)).expanduser()
    if not path.is_file():
        raise ConfigError("data.path", f"file not found: {path}")
    if not any(s in (".csv", ".tsv", ".parquet", ".pq") for s in path.suffixes):
        raise ConfigError("data.path", f"cannot tell the format of {path.name}; use a .csv, .tsv or .parquet file")
    _check_unique_names(path)
    return path


def _header(path: Path) -> list[str]:
    """The column names as the file has them (pandas renames a repeated CSV name 'a' to 'a.1'); [] if unreadable."""
    try:
        if _is_parquet(path):
            return list(pq.read_schema(path).names)
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            return next(csv.reader(f, delimiter="\t" if ".tsv" in path.suffixes else ","), [])
    except (OSError, ValueError, pa.ArrowException):
        return []  # read() reports a file it cannot read, in its own words


def _check_unique_names(path: Path) -> None:
    """Refuse a file that gives two columns one name: pandas would rename one and both would be used as features."""
    names = _header(path)
    repeated = {n: names.count(n) for n in dict.fromkeys(names) if names.count(n) > 1}
    if repeated:
        shown = ", ".join(f"'{n}' ({k} times)" for n, k in list(repeated.items())[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise ConfigError("data.path", f"{path.name} names {len(repeated)} column(s) more than once: {shown}{more}; "
                          "give each column its own name")


def _is_parquet(path: Path) -> bool:
    return path.suffix in (".parquet", ".pq")


def read(path: Path, columns: list[str] | None = None, nrows: int | None = None) -> pd.DataFrame:
    """Read the file, or only the named columns (nrows=0: just the header, CSV only)."""
    try:
        if _is_parquet(path):
            if nrows == 0:
                return pq.read_schema(path).empty_table().to_pandas()
            return pd.read_parquet(path, columns=columns)
        return pd.read_csv(path, usecols=columns, nrows=nrows, sep="\t" if ".tsv" in path.suffixes else ",")
    except (OSError, ValueError) as err:  # pandas' and pyarrow's parse errors are ValueErrors
        raise ConfigError("data.path", f"cannot read {path.name}: {str(err).splitlines()[0]}") from err


def check_named(data: Mapping, roles, header: list[str], file: str) -> str:
    """Raise ConfigError naming the first of ``roles`` (config keys) whose column is not in ``header``; return the
    header as shown in such messages."""
    shown = ", ".join(map(str, header[:20])) + (", ..." if len(header) > 20 else "")
    for role in roles:
        if data.get(role) is not None and data[role] not in header:
            raise ConfigError(f"data.{role}", f"no column '{data[role]}' in {file}; columns are: {shown}")
    return shown


def _check_columns(data: Mapping, path: Path) -> None:
    """Every column the config names exists; natural needs an institution column."""
    header = list(read(path, nrows=0).columns)
    shown = check_named(data, _ROLES, header, path.name)
    listed = data["feature_columns"]
    if listed is not None and (isinstance(listed, str) or not all(isinstance(c, str) for c in listed)):
        raise ConfigError("data.feature_columns", f"must be a list of column names or null, got {listed!r}")
    for col in listed or []:
        if col not in header:
            raise ConfigError("data.feature_columns", f"no column '{col}' in {path.name}; columns are: {shown}")
    if data["partition"] == "natural" and data["institution_column"] is None:
        raise ConfigError("data.institution_column",
                          "partition natural needs the column that names each row's institution")


def _is_test(df: pd.DataFrame, column: str | None) -> np.ndarray | None:
    """Rows the split column marks as test (None without a split column)."""
    if column is None:
        return None
    values = df[column].astype(str).str.strip().str.lower()
    bad = sorted(set(values) - {"train", "test"})
    if bad:
        raise ConfigError("data.split_column", f"values must be 'train' or 'test'; found {', '.join(bad[:5])}")
    return (values == "test").to_numpy()


def _natural_parts(df, data, scenario, seed) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) rows of each institution, by the institution column."""
    groups = df[data["institution_column"]].astype(str).to_numpy()
    found = list(dict.fromkeys(groups))
    parts, is_test = [], _is_test(df, data["split_column"])
    for spec, idx in zip(scenario.institutions, natural(groups, scenario.names)):
        if len(idx) == 0:
            raise ConfigError("data.institution_column", f"institution '{spec.name}' has no rows in column "
                              f"'{data['institution_column']}'; names found: {', '.join(found[:20])}")
        parts.append(split_rows(idx, is_test, data["test_fraction"], seed, spec.index))
    return parts


def split_rows(idx: np.ndarray, is_test: np.ndarray | None, test_fraction: float, seed: int,
               index: int) -> tuple[np.ndarray, np.ndarray]:
    """An institution's (train, test) rows: by the table's split column when it has one, else a seeded test_fraction."""
    if is_test is None:
        return split_train_test(idx, test_fraction, stream(seed, SPLIT, index))
    return idx[~is_test[idx]], idx[is_test[idx]]


def check(data: Mapping, scenario: Scenario) -> None:
    """Validate the file, the columns named and (natural) that every institution has enough rows."""
    path = _path(data)
    _check_columns(data, path)
    df = read(path)
    checks.check_table(df, data, path)  # empty table, labels, non-numeric, missing or infinite features
    if data["partition"] != "natural":
        check_partition(data, scenario, len(df))
        return
    parts = _natural_parts(df, data, scenario, seed=0)  # sizes do not depend on the seed
    check_sizes(scenario.names, [len(tr) for tr, _ in parts], [len(te) for _, te in parts], "scenario.institutions",
                f"add rows for it to {path.name} or drop it from the scenario")


def _features(df: pd.DataFrame, data: Mapping, path: Path) -> np.ndarray:
    """The feature matrix (float64), checked numeric, complete and finite (sim/core/data/checks.py)."""
    columns = checks.feature_columns(df, data, path)
    checks.check_features(df, data, path, columns)
    return df[list(columns)].to_numpy(dtype=np.float64)


def _labels(df: pd.DataFrame, column: str) -> tuple[np.ndarray, int]:
    """Labels mapped to 0..C-1 in sorted order, and C."""
    if df[column].isna().any():
        raise ConfigError("data.label_column", f"{int(df[column].isna().sum())} rows have no label in "
                          f"'{column}'; drop them")
    values = df[column].to_numpy()
    try:
        classes, codes = np.unique(values, return_inverse=True)
    except TypeError:  # mixed types: sort by their text
        classes, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64), len(classes)


def _smoke_rows(df: pd.DataFrame, data: Mapping, scenario: Scenario, seed: int) -> np.ndarray:
    """Rows kept under smoke=True: a proportional sample of every (institution, split) group."""
    keys = [data[c] for c in ("institution_column", "split_column") if data[c] is not None]
    if data["partition"] != "natural":
        keys = [k for k in keys if k == data["split_column"]]
        target = smoke_size(scenario, data["test_fraction"], len(df))
    else:
        target = SMOKE_SAMPLES
    group = df[keys].astype(str).agg("|".join, axis=1).to_numpy() if keys else np.zeros(len(df), dtype=str)
    rng, frac, keep = stream(seed, SMOKE), min(1.0, target / max(len(df), 1)), []
    for g in dict.fromkeys(group):
        rows = np.flatnonzero(group == g)
        m = min(len(rows), max(smallest_workable(data["test_fraction"]), int(np.ceil(frac * len(rows)))))
        keep.append(rng.choice(rows, m, replace=False))
    return np.sort(np.concatenate(keep))


def build(data: Mapping, scenario: Scenario, seed: int, smoke: bool = False) -> Pool:
    """Load the table, split it among institutions and standardise the features."""
    path = _path(data)
    _check_columns(data, path)
    df = read(path)
    if smoke:
        df = df.iloc[_smoke_rows(df, data, scenario, seed)].reset_index(drop=True)
    x, (y, num_classes) = _features(df, data, path), _labels(df, data["label_column"])
    if data["partition"] == "natural":
        parts = _natural_parts(df, data, scenario, seed)
    else:
        shards = partition(y, num_classes, data, scenario, stream(seed, PARTITION))
        is_test = _is_test(df, data["split_column"])
        parts = [
            split_train_test(idx, data["test_fraction"], stream(seed, SPLIT, spec.index))
            if is_test is None else (np.sort(idx[~is_test[idx]]), np.sort(idx[is_test[idx]]))
            for spec, idx in zip(scenario.institutions, shards)
        ]
    train = np.concatenate([tr for tr, _ in parts])
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)  # constant columns stay 0
    return Pool(x, y, parts, num_classes)


def sites_from_table(data: Mapping) -> list[tuple[str, str, int]]:
    """(institution, discipline, n_rows) per site of the file (table or text data), in order of first appearance.

    Every site must be able to train and be scored alone: enough rows for its train,
    validation and test splits (checked here); sim.core.data.checks refuses a site with a single class.
    """
    if data.get("name") not in ("table", "text"):
        raise ConfigError("data.name", f"sites come from a file; got dataset '{data.get('name')}', use data=table or data=text")
    data = {**DEFAULTS, **data}  # text data name no discipline column: the table default (none) applies
    inst, disc = data["institution_column"], data["discipline_column"]
    if inst is None:
        raise ConfigError("data.institution_column", "name the column that says which site each row comes from")
    path = _path(data)
    check_named(data, ("institution_column", "discipline_column"), list(read(path, nrows=0).columns), path.name)
    df = read(path, list(dict.fromkeys(c for c in (inst, disc) if c is not None)))
    if df[inst].isna().any():
        raise ConfigError("data.institution_column", f"{int(df[inst].isna().sum())} rows of {path.name} name no site in "
                          f"'{inst}'; fill or drop them")
    if df.empty:
        raise ConfigError("data.path", f"{path.name} has no rows (only a header)")
    df[inst] = df[inst].astype(str)
    need = rows_needed(data["test_fraction"], data.get("val_fraction", 0.0))
    sites = []
    for name, rows in df.groupby(inst, sort=False):
        kinds = sorted(set(rows[disc].astype(str))) if disc is not None else [NO_DISCIPLINE]
        if len(kinds) > 1:
            raise ConfigError("data.discipline_column", f"institution '{name}' has rows from several "
                              f"disciplines: {', '.join(kinds[:5])}; give each institution one discipline")
        if len(rows) < need:
            raise ConfigError("data.institution_column", f"site '{name}' has {len(rows)} row{'s' * (len(rows) != 1)} in "
                              f"{path.name}; a site needs at least {need} (train, validation and test rows): "
                              "drop it or merge it into another site")
        sites.append((str(name), kinds[0], len(rows)))
    return sites


def rows_needed(test_fraction: float, val_fraction: float) -> int:
    """Fewest rows an institution needs: MIN_TEST test rows, one validation row (if any are held out), MIN_TRAIN to train."""
    n = smallest_workable(test_fraction)
    while True:
        train = n - num_test(n, test_fraction)
        val = num_test(train, val_fraction) if val_fraction > 0 else 0
        if num_test(n, test_fraction) >= MIN_TEST and train - val >= MIN_TRAIN and (val_fraction == 0 or val >= 1):
            return n
        n += 1
