"""Checks of a user's table before it is trusted: every value problem is one line naming file, column and institution.

Refused: an empty (header-only) table; a label column with missing values or with a single
class overall; feature columns with text, missing values or infinities; a column that mixes
numbers and text. Warned, not refused: an institution holding a single class (its accuracy is
over one class; sim.core.caveats repeats that in the summary and the report), and a constant
feature column: it carries no information but does no harm (after standardisation it is 0
everywhere), and one-hot files often hold a column that a subset of rows never sets, so
refusing it would turn away good data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from sim.core.types import ConfigError, listing, shown

log = logging.getLogger("collabsim")
ROLES = ("label_column", "institution_column", "discipline_column", "split_column")


def _where(df: pd.DataFrame, data: Mapping, rows: np.ndarray) -> str:
    """' (institution X, first at data row N; K rows in all)': where in the file a problem starts, and how far it goes."""
    i = int(np.flatnonzero(rows)[0])
    inst = data.get("institution_column")
    site = f"institution '{df[inst].iloc[i]}', " if inst is not None and inst in df.columns else ""
    count = int(np.count_nonzero(rows))
    return f" ({site}first at data row {i + 1}{f'; {count} rows in all' if count > 1 else ''})"


def _mixed(values: pd.Series) -> bool:
    """Whether a text column is mostly numbers with some text: a typo, not a column of names."""
    present = values.dropna()
    numbers = pd.to_numeric(present, errors="coerce")
    return len(present) > 0 and numbers.notna().mean() >= 0.5 and numbers.isna().any()


def feature_columns(df: pd.DataFrame, data: Mapping, path: Path) -> list[str]:
    """The input columns: data.feature_columns, or every other numeric column (refusing numbers mixed with text)."""
    listed = data["feature_columns"]
    if listed is not None:
        return list(listed)
    roles = {data[r] for r in ROLES}
    columns = []
    for c in df.columns:
        if c in roles:
            continue
        if pd.api.types.is_numeric_dtype(df[c]):
            columns.append(c)
        elif _mixed(df[c]):
            bad = pd.to_numeric(df[c], errors="coerce").isna() & df[c].notna()
            raise ConfigError("data.feature_columns", f"column '{c}' of {path.name} mixes numbers and text, e.g. "
                              f"{shown(df[c][bad].iloc[0])}{_where(df, data, bad.to_numpy())}; fix the value or list "
                              "the inputs in data.feature_columns")
    if not columns:
        raise ConfigError("data.feature_columns", f"{path.name} has no numeric columns besides "
                          "the label; list the inputs in data.feature_columns")
    return columns


def check_features(df: pd.DataFrame, data: Mapping, path: Path, columns: list[str]) -> None:
    """Every feature column numeric, complete and finite; a constant one is warned about."""
    for col in columns:
        values = df[col]
        if not pd.api.types.is_numeric_dtype(values):
            bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
            example = f", e.g. {shown(values[bad].iloc[0])}{_where(df, data, bad.to_numpy())}" if bad.any() else ""
            raise ConfigError("data.feature_columns", f"column '{col}' of {path.name} is not numeric "
                              f"({values.dtype}{example}); encode it as numbers or leave it out of data.feature_columns")
        missing = values.isna().to_numpy()
        if missing.any():
            raise ConfigError("data.path", f"column '{col}' of {path.name} has {int(missing.sum())} missing values"
                              f"{_where(df, data, missing)}; fill or drop them")
        infinite = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if infinite.any():
            raise ConfigError("data.path", f"column '{col}' of {path.name} has {int(infinite.sum())} infinite values"
                              f"{_where(df, data, infinite)}; replace or drop them")
        if len(values) > 1 and values.nunique() == 1:
            log.warning("data: column '%s' of %s is constant (%s): it carries no information", col, path.name,
                        shown(values.iloc[0]))


def check_labels(df: pd.DataFrame, data: Mapping, path: Path) -> None:
    """Labels complete, of at least two classes overall and (partition natural) at every institution."""
    column = data["label_column"]
    labels = df[column]
    missing = labels.isna().to_numpy()
    if missing.any():
        raise ConfigError("data.label_column", f"{int(missing.sum())} rows of {path.name} have no label in "
                          f"'{column}'{_where(df, data, missing)}; drop them")
    text = labels.astype(str)
    if text.nunique() < 2:
        raise ConfigError("data.label_column", f"column '{column}' of {path.name} holds one class only "
                          f"({shown(labels.iloc[0])}); a classifier needs at least two: check data.label_column")
    inst = data.get("institution_column")
    if data.get("partition") == "natural" and inst is not None:
        per_site = text.groupby(df[inst].astype(str), sort=False).nunique()
        single = sorted(per_site[per_site < 2].index)
        if single and len(single) == len(per_site):  # each institution its own class: alone, every one is trivially right
            raise ConfigError("data.label_column", f"every institution holds a single class in column '{column}' of "
                              f"{path.name}, so each is 100% right alone by always answering it; check "
                              "data.label_column and data.institution_column")
        if single:  # legitimate (a specialised clinic, LEAF-style populations): run, and say what it means
            log.warning("warning: data.label_column: %d institution%s hold%s one class only in column '%s' of %s (%s): "
                        "%s accuracy is over one class, and the run's summary and report say so", len(single),
                        "s" if len(single) != 1 else "", "s" if len(single) == 1 else "", column, path.name,
                        listing((f"'{s}'" for s in single), 5),
                        "its" if len(single) == 1 else "their")


def check_table(df: pd.DataFrame, data: Mapping, path: Path) -> list[str]:
    """All value checks of a table read in full; returns its feature columns."""
    if len(df) == 0:
        raise ConfigError("data.path", f"{path.name} has no rows (only a header); give it one row per sample")
    check_labels(df, data, path)
    columns = feature_columns(df, data, path)
    check_features(df, data, path, columns)
    return columns
