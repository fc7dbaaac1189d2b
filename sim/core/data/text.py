"""A user's own text: one CSV, TSV or Parquet file, one row per document (the text twin of ``table``).

``text_column`` holds the document, ``label_column`` its class (any type; mapped to 0..C-1
in sorted order over the whole file). With ``partition: natural`` institution k gets the
rows whose ``institution_column`` equals its name and the file, not the scenario shares,
decides sizes; iid, dirichlet and quantity split the rows by the shares as for ``table``.
``split_column`` (values train/test) fixes the split, else each institution holds out
``test_fraction``. ``max_rows_per_institution`` keeps a label-stratified sample of each
institution's rows (smoke runs keep at most SMOKE_ROWS).

Builders of text datasets return the texts; ``sim.core.data.build_federation`` tokenises them
once with the model's tokenizer (:func:`tokenize`) into int64 token ids. The helpers
below (:func:`finish`, :func:`compact`, :func:`check_common`) are shared with the
``docstrings`` corpus.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sim.core.data.partition import (
    PARTITION, ROWS, SPLIT, Pool, apportion, check_partition, check_sizes, natural, partition, smallest_workable,
    split_stratified, stream,
)
from sim.core.data.table import _is_test, _labels, _path, check_named, read, split_rows
from sim.core.types import ConfigError, Scenario, listing

log = logging.getLogger("collabsim")

DEFAULTS = {
    "name": "text",
    "path": None,
    "text_column": "text",
    "label_column": "label",
    "institution_column": "institution",
    "split_column": None,
    "partition": "natural",
    "test_fraction": 0.2,
    "dirichlet_alpha": 0.5,
    "quantity_exponent": 1.5,
    "max_length": 32,
    "max_rows_per_institution": None,
}
SMOKE_ROWS = 60  # rows per institution kept under smoke=True: a few batches, seconds per round on a CPU
MAX_TOKENS = 512  # BERT-family models have 512 position embeddings
TRANSFORMERS = "sim.core.models.foundation"  # the module whose factories take token ids
_ROLES = ("text_column", "label_column", "institution_column", "split_column")


def check_model(name: str, model: Mapping | None) -> None:
    """A text dataset needs a transformer model (a factory of sim.core.models.foundation)."""
    target = str((model or {}).get("_target_") or "")
    module, _, attr = target.rpartition(".")
    ok = module == TRANSFORMERS
    if not ok and module:  # a factory re-exported elsewhere still counts when it lives in the foundation module
        try:
            ok = getattr(getattr(importlib.import_module(module), attr), "__module__", "") == TRANSFORMERS
        except (ImportError, AttributeError, ValueError):
            ok = False
    if not ok:
        raise ConfigError("model", f"data={name} holds text; use a transformer model: "
                          "model=minilm, model=hf or model=tiny_transformer")


def tokenize(texts: Sequence[str], model: Mapping, max_length: int) -> np.ndarray:
    """Token ids (int64, (n, max_length), padded with the tokenizer's pad id) of every text, in one call."""
    from sim.core.models.foundation import load_tokenizer  # transformers is slow to import; only text runs pay

    tok = load_tokenizer(model)
    if len(texts) == 0:
        return np.zeros((0, max_length), np.int64)
    ids = tok([str(t) for t in texts], padding="max_length", truncation=True, max_length=max_length,
              return_tensors="np")["input_ids"]
    return np.ascontiguousarray(ids, dtype=np.int64)


def check_common(data: Mapping, scenario: Scenario) -> None:
    """Keys every text dataset shares (max_length, max_rows_per_institution) and no feature skew."""
    n = data["max_length"]
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= MAX_TOKENS:
        raise ConfigError("data.max_length", f"must be a whole number in [2, {MAX_TOKENS}] "
                          f"(tokens per text, [CLS] and [SEP] included), got {n!r}")
    cap, need = data["max_rows_per_institution"], smallest_workable(data["test_fraction"])
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < need):
        raise ConfigError("data.max_rows_per_institution", f"must be a whole number >= {need} (enough to "
                          f"train and test on) or null for all rows, got {cap!r}")
    for spec in scenario.institutions:
        if spec.feature_skew > 0:
            raise ConfigError(f"scenario.institutions[{spec.index}].feature_skew",
                              f"'{spec.name}' of scenario={scenario.name} asks for feature_skew {spec.feature_skew}, "
                              f"but text inputs are token ids and cannot be shifted; {_text_scenario(data)}")


def _text_scenario(data: Mapping) -> str:
    """Which scenario suits a text dataset, for a message."""
    if data["name"] == "docstrings":
        return "use scenario=docstrings (data=docstrings picks it unless a scenario is named) or a scenario without shifts"
    return ("make each site of the file an institution with data.institution_column=COLUMN, or use a scenario "
            "without shifts")


def row_limit(data: Mapping, smoke: bool) -> int | None:
    """Most rows an institution keeps: data.max_rows_per_institution, at most SMOKE_ROWS under smoke."""
    caps = [c for c in (data["max_rows_per_institution"], SMOKE_ROWS if smoke else None) if c is not None]
    return min(caps) if caps else None


def cap(idx: np.ndarray, strata: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of ``idx`` (sorted), each stratum keeping its share (largest remainder)."""
    if limit is None or len(idx) <= limit:
        return np.sort(idx)
    groups, counts = np.unique(strata[idx], return_counts=True)
    take = apportion(counts / counts.sum(), limit)
    picked = [rng.choice(idx[strata[idx] == g], t, replace=False) for g, t in zip(groups, take)]
    return np.sort(np.concatenate(picked))


def finish(shards: Sequence[np.ndarray], y: np.ndarray, is_test: np.ndarray | None, data: Mapping,
           scenario: Scenario, seed: int, limit: int | Sequence[int] | None, classes: Sequence[Any], hint: tuple[str, str],
           stratify: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cap each institution's rows, split train/test (``stratify``: each label keeps its share of the test split);
    warn of those left with a single class (``hint`` = key, how to give them more): they run, and the run's summary
    and report say their accuracy is over one class."""
    strata = y * 2 + is_test if is_test is not None else y  # with a split column, keep its train/test mix too
    parts, single = [], []
    limits = limit if isinstance(limit, (list, tuple)) else [limit] * len(shards)  # one cap, or one each
    for spec, idx, most in zip(scenario.institutions, shards, limits):
        idx = cap(np.asarray(idx, np.int64), strata, most, stream(seed, ROWS, spec.index))
        held = np.unique(y[idx])
        if len(held) == 1:
            single.append(f"'{spec.name}' only {classes[int(held[0])]!r}")
        if stratify and is_test is None:
            parts.append(split_stratified(idx, y, data["test_fraction"], stream(seed, SPLIT, spec.index)))
        else:
            parts.append(split_rows(idx, is_test, data["test_fraction"], seed, spec.index))
    shown = listing(single, 5)
    if single and len(single) == len(parts):  # each institution its own class: alone, every one is trivially right
        raise ConfigError(hint[0], f"every institution would hold a single class ({shown}), so each is 100% right "
                          f"alone by always answering it; {hint[1]}")
    if single:
        log.warning("warning: %s: %d institution%s hold%s a single class (%s): %s accuracy is over one class; to give "
                    "%s more, %s", hint[0], len(single), "s" if len(single) != 1 else "", "s" if len(single) == 1 else "",
                    shown, "its" if len(single) == 1 else "their", "it" if len(single) == 1 else "them", hint[1])
    return parts


def compact(texts: np.ndarray, y: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> Pool:
    """A Pool of only the rows some institution holds (texts, not yet token ids), indices renumbered."""
    used = np.unique(np.concatenate([np.concatenate(p) for p in parts]))
    renumber = np.full(len(y), -1, np.int64)
    renumber[used] = np.arange(len(used))
    return Pool(np.asarray(texts, dtype=object)[used], y[used],
                [(renumber[tr], renumber[te]) for tr, te in parts], num_classes)


def _check_columns(data: Mapping, header: list[str], file: str) -> None:
    """Every column the config names exists; natural needs an institution column."""
    check_named(data, _ROLES, header, file)
    if data["partition"] == "natural" and data["institution_column"] is None:
        raise ConfigError("data.institution_column",
                          "partition natural needs the column that names each row's institution")


def _load(data: Mapping) -> tuple[pd.DataFrame, str]:
    """The columns of the file that the config names, checked to exist, and the file's name."""
    path = _path(data)
    _check_columns(data, list(read(path, nrows=0).columns), path.name)
    df = read(path, [data[r] for r in _ROLES if data[r] is not None])
    texts = df[data["text_column"]]
    if len(df) == 0 or texts.isna().all() or (texts.astype(str).str.strip() == "").all():
        raise ConfigError("data.text_column", f"column '{data['text_column']}' of {path.name} holds no text; "
                          "point data.text_column at the column with the documents")
    if pd.api.types.is_numeric_dtype(texts) or pd.api.types.is_bool_dtype(texts):
        first = texts.dropna().iloc[0]
        raise ConfigError("data.text_column", f"column '{data['text_column']}' of {path.name} holds numbers, not text "
                          f"(e.g. {first.item() if isinstance(first, np.generic) else first}); point data.text_column "
                          "at the column with the documents")
    return df, path.name


def _shards(df: pd.DataFrame, y: np.ndarray, num_classes: int, data: Mapping, scenario: Scenario,
            seed: int, file: str) -> list[np.ndarray]:
    """Each institution's rows: by the institution column (natural) or by data.partition."""
    if data["partition"] != "natural":
        return partition(y, num_classes, data, scenario, stream(seed, PARTITION))
    column = data["institution_column"]
    groups = df[column].astype(str).to_numpy()
    found = list(dict.fromkeys(groups))
    if not set(found) & set(scenario.names):
        raise ConfigError("data.institution_column", f"column '{column}' of {file} names no institution of the "
                          f"scenario ({', '.join(scenario.names[:8])}); names found: {', '.join(found[:8])}")
    shards = natural(groups, scenario.names)
    for spec, idx in zip(scenario.institutions, shards):
        if len(idx) == 0:
            raise ConfigError("data.institution_column", f"institution '{spec.name}' has no rows in column "
                              f"'{column}' of {file}; names found: {', '.join(found[:20])}")
    return shards


def _classes(values: np.ndarray) -> np.ndarray:
    """Class names in the order of table's label ids (sorted; by their text when types are mixed)."""
    try:
        return np.unique(values)
    except TypeError:
        return np.unique(values.astype(str))


def _split(df: pd.DataFrame, file: str, data: Mapping, scenario: Scenario, seed: int, smoke: bool):
    """Texts, labels, number of classes and every institution's (train, test) rows."""
    y, num_classes = _labels(df, data["label_column"])
    classes = _classes(df[data["label_column"]].to_numpy())
    shards = _shards(df, y, num_classes, data, scenario, seed, file)
    fix = ("data.label_column", "give it rows of at least two labels") \
        if data["partition"] == "natural" else \
        ("data.partition", "use partition=iid or a larger data.dirichlet_alpha")
    parts = finish(shards, y, _is_test(df, data["split_column"]), data, scenario, seed,
                   row_limit(data, smoke), classes, fix)
    texts = df[data["text_column"]].fillna("").astype(str).to_numpy(dtype=object)
    return texts, y, num_classes, parts


def check(data: Mapping, scenario: Scenario) -> None:
    """Validate the keys, the file, its columns and (natural) every institution's rows and classes."""
    check_common(data, scenario)
    df, file = _load(data)
    if data["partition"] != "natural":
        _labels(df, data["label_column"])  # refuses rows without a label
        check_partition(data, scenario, len(df))
        return
    _, _, _, parts = _split(df, file, data, scenario, seed=0, smoke=False)  # sizes do not depend on the seed
    check_sizes(scenario.names, [len(tr) for tr, _ in parts], [len(te) for _, te in parts], "scenario.institutions",
                f"add rows for it to {file} or drop it from the scenario")


def build(data: Mapping, scenario: Scenario, seed: int, smoke: bool = False) -> Pool:
    """Read the file and give every institution its (train, test) rows; x holds the texts."""
    df, file = _load(data)
    texts, y, num_classes, parts = _split(df, file, data, scenario, seed, smoke)
    return compact(texts, y, parts, num_classes)
