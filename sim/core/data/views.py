"""Different views of the same cases: institutions that hold different columns or modalities of one set of entities.

``data.views`` gives each institution its view and ``data.label_holder`` names the one that holds
the labels (vertical / multimodal collaboration, :mod:`agents.schemes.split_learning`):

- ``data=table``: ``views: {hospital: [age, bmi], bank: [income, debt]}``, columns of one file; each row is
  an entity, named by ``data.entity_column`` (null: its row number). Every feature column goes to exactly
  one institution (a column in two views, or in none, is refused, naming it).
- ``data=docstrings``: ``views: {docs_team: text, code_lab: code}``: the same documented objects of the eight
  packages seen as **text** (the docstring's first paragraph as word and word-pair tf-idf) and as
  **code structure** (read with ``ast`` from the same source by :mod:`sim.core.data.code_structure`: arguments,
  defaults, decorators, lines, returns, raises, yields, nesting, ...), labelled by ``data.task`` (kind or
  discipline). The code view also holds public objects that have no docstring, which the text view cannot.

``data.overlap``: each institution holds each entity with this probability (drawn from its own stream), so the
parties' entity sets only partly overlap and training uses their intersection, found by a private set
intersection (:mod:`agents.schemes.psi`). This module only builds each party's view: identifiers, features
(standardised by the party over its own rows) and, at the label holder, labels. Nothing here aligns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from sim.core.data import checks, docstrings, table, text
from sim.core.data.partition import stream
from sim.core.types import ConfigError, Scenario, listing

KEYS = {"views": None, "label_holder": None, "overlap": 1.0}
"""Keys every dataset with views takes (data=table adds entity_column); null views: one feature space, horizontal."""
TABLE_KEYS = {**KEYS, "entity_column": None}
MODALITIES = ("text", "code")  # docstrings views
VIEW_TASKS = ("kind", "discipline")  # docstrings labels that every object of every package has
TEXT_FEATURES = 4096  # most words and word pairs a text view keeps (tf-idf over its own texts, seen twice or more)
HOLDS, EXTRA = 11, 12  # streams: which entities a party holds; which undocumented objects the code view adds
EXTRA_SHARE = 0.25  # docstrings: the code view also holds this many undocumented objects per documented one
SMOKE_ENTITIES = 120


@dataclass(frozen=True)
class View:
    """One institution's view: its entities' identifiers and features (rows in the same order)."""

    party: str
    ids: np.ndarray  # str identifiers, unique
    x: np.ndarray  # float32 (entities, features), standardised over the party's own rows
    columns: tuple[str, ...]  # feature names


@dataclass(frozen=True)
class Views:
    """Every institution's view, and the label holder's labels (aligned with its view's ids)."""

    views: tuple[View, ...]
    label_holder: str
    y: np.ndarray  # int64 labels of the label holder's entities
    classes: tuple[str, ...]

    def of(self, party: str) -> View:
        """The view of ``party``."""
        return next(v for v in self.views if v.party == party)


def uses_views(data: Mapping) -> bool:
    """Whether ``data`` splits features between institutions (data.views set)."""
    return bool(data.get("views"))


def _parties(data: Mapping, scenario: Scenario) -> dict:
    """data.views as {party: view} in scenario order, checked against the scenario and label_holder."""
    views = data.get("views")
    if not isinstance(views, Mapping) or not views:
        raise ConfigError("data.views", f"expected {{institution: view, ...}}, got {views!r}")
    names = list(scenario.names)
    unknown = [p for p in views if p not in names]
    if unknown:
        raise ConfigError("data.views", f"institution(s) {listing(map(repr, unknown))} are not in scenario="
                          f"{scenario.name} ({listing(names, 8)}); give a view to each of the scenario's institutions")
    missing = [n for n in names if n not in views]
    if missing:
        raise ConfigError("data.views", f"institution(s) {listing(map(repr, missing))} of scenario={scenario.name} "
                          "hold no view; give each one a view or drop it from the scenario")
    holder = data.get("label_holder")
    if holder is None:
        raise ConfigError("data.label_holder", f"no institution holds the labels; name one of {listing(names, 8)}")
    if holder not in views:
        raise ConfigError("data.label_holder", f"'{holder}' holds no view; name one of {listing(names, 8)}")
    overlap = data.get("overlap", 1.0)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 < overlap <= 1:
        raise ConfigError("data.overlap", f"must lie in (0, 1], got {overlap!r}")
    return {n: views[n] for n in names}


def _table_columns(data: Mapping, parties: dict, header: list[str], path: Path) -> None:
    """Each view lists columns of the file, none of them a role column, none in two views."""
    roles = {data[r]: r for r in ("label_column", "entity_column", "institution_column", "split_column",
                                  "discipline_column") if data.get(r) is not None}
    owner: dict[str, str] = {}
    shown = ", ".join(header[:20]) + (", ..." if len(header) > 20 else "")
    for party, columns in parties.items():
        if isinstance(columns, str) or not columns or not all(isinstance(c, str) for c in columns):
            raise ConfigError(f"data.views.{party}", f"expected a non-empty list of column names, got {columns!r}")
        for c in columns:
            if c not in header:
                raise ConfigError(f"data.views.{party}", f"no column '{c}' in {path.name}; columns are: {shown}")
            if c in roles:
                raise ConfigError(f"data.views.{party}", f"'{c}' is data.{roles[c]}, not a feature; leave it out")
            if c in owner:
                raise ConfigError("data.views", f"column '{c}' is in the views of both '{owner[c]}' and '{party}'; "
                                  "give each column to one institution")
            owner[c] = party


def check(data: Mapping, scenario: Scenario) -> None:
    """Validate data.views, data.label_holder and data.overlap against the scenario and the data (ConfigError)."""
    parties = _parties(data, scenario)
    if data["name"] == "docstrings":
        for party, modality in parties.items():
            if modality not in MODALITIES:
                raise ConfigError(f"data.views.{party}", f"unknown view {modality!r}; data=docstrings has "
                                  f"{' and '.join(MODALITIES)}")
        seen = [m for m in parties.values()]
        twice = sorted({m for m in seen if seen.count(m) > 1})
        if twice:
            raise ConfigError("data.views", f"view '{twice[0]}' is given to {seen.count(twice[0])} institutions; give "
                              "each view to one institution")
        if data["task"] not in VIEW_TASKS:
            raise ConfigError("data.task", f"views label every object by {' or '.join(VIEW_TASKS)}; got "
                              f"{data['task']!r}")
        docstrings.check_versions()
        return
    if data["name"] != "table":
        raise ConfigError("data.views", f"data={data['name']} has one feature space; views apply to data=table "
                          "and data=docstrings")
    path = table._path(data)
    df = table.read(path)
    header = [str(c) for c in df.columns]
    table.check_named(data, ("label_column", "entity_column"), header, path.name)
    _table_columns(data, parties, header, path)
    if data.get("entity_column") is not None and df[data["entity_column"]].astype(str).duplicated().any():
        dup = df[data["entity_column"]].astype(str)
        raise ConfigError("data.entity_column", f"'{dup[dup.duplicated()].iloc[0]}' names two rows of {path.name}; "
                          "each entity needs its own identifier")
    checks.check_labels(df, {**data, "partition": "iid"}, path)
    assigned = [c for cols in parties.values() for c in cols]
    features = checks.feature_columns(df.drop(columns=[data["entity_column"]] if data.get("entity_column") else []),
                                      data, path)
    left = [c for c in features if c not in assigned]
    if left:
        raise ConfigError("data.views", f"column(s) {listing(map(repr, left))} of {path.name} are in no institution's "
                          "view; give each to one institution, or list the columns to use in data.feature_columns")
    checks.check_features(df, data, path, assigned)


def build(data: Mapping, scenario: Scenario, seed: int, smoke: bool = False) -> Views:
    """Every institution's view of its own entities (a seeded ``overlap`` share of them), and the labels."""
    parties = _parties(data, scenario)
    holder = data["label_holder"]
    if data["name"] == "docstrings":
        ids, frames, y, classes, extra = _docstrings(data, parties, seed, smoke)
    else:
        ids, frames, y, classes, extra = _table(data, parties, seed, smoke)
    views = []
    for k, (party, frame) in enumerate(frames.items()):
        held = stream(seed, HOLDS, k).random(len(ids)) < float(data["overlap"])
        own = np.flatnonzero(held)
        party_ids, x = ids[own], frame[own]
        if party in extra and party != holder:  # objects only this view can hold (undocumented code, so no label)
            party_ids, x = np.concatenate([party_ids, extra[party][0]]), np.concatenate([x, extra[party][1]])
        if party == holder:
            labels = y[own]
        order = np.argsort(party_ids, kind="stable")  # a party's own order, unrelated to anybody else's
        x = x[order]
        if x.dtype == object:  # texts: tf-idf fitted on the party's own texts (no labels), rows of unit length as
            x = _tfidf(x)      # they are (a rare word standardised would dwarf the rest)
        else:
            mean, std = x.mean(axis=0), x.std(axis=0)
            x = (x - mean) / np.where(std > 0, std, 1.0)
        x = x.astype(np.float32)
        views.append(View(party, party_ids[order], x, tuple(_names(party, x, data))))
        if party == holder:
            labels = labels[order]
    return Views(tuple(views), holder, labels.astype(np.int64), tuple(classes))


def _tfidf(texts: np.ndarray) -> np.ndarray:
    """Word and word-pair tf-idf (sublinear counts, l2 rows) of one party's texts, fitted on them alone."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=TEXT_FEATURES)
    return vectorizer.fit_transform([str(t) for t in texts]).toarray()


def _names(party: str, frame: np.ndarray, data: Mapping) -> list[str]:
    """Feature names of a view (for messages)."""
    if data["name"] == "table":
        return list(data["views"][party])
    from sim.core.data.code_structure import FEATURES

    return list(FEATURES) if data["views"][party] == "code" else [f"tfidf{i}" for i in range(frame.shape[1])]


def _table(data: Mapping, parties: dict, seed: int, smoke: bool):
    """(entity ids, {party: features}, labels, classes, extras) of a table."""
    path = table._path(data)
    df = table.read(path)
    if smoke and len(df) > SMOKE_ENTITIES * 5:
        df = df.iloc[np.sort(stream(seed, 0).choice(len(df), SMOKE_ENTITIES * 5, replace=False))]
    col = data.get("entity_column")
    ids = (df[col].astype(str) if col else pd.Series([f"row{i}" for i in df.index])).to_numpy(dtype=object)
    y, _ = table._labels(df, data["label_column"])
    classes = [str(c) for c in np.unique(df[data["label_column"]].astype(str))]
    frames = {p: df[list(cols)].to_numpy(dtype=np.float64) for p, cols in parties.items()}
    return ids, frames, y, classes, {}


def _docstrings(data: Mapping, parties: dict, seed: int, smoke: bool):
    """(entity ids, {party: features}, labels, classes, extras) of the docstrings corpus as text and code views."""
    from sim.core.data.code_structure import FEATURES, structure

    docs = docstrings.corpus(data["cache_dir"]).drop_duplicates("qualname").reset_index(drop=True)
    code = structure(data["cache_dir"])
    docs = docs[docs["qualname"].isin(code.index)].reset_index(drop=True)  # every documented object has its code
    spare = code.index[~code.index.isin(docs["qualname"])].to_numpy(dtype=object)  # public, no docstring to read
    task = data["task"]
    classes, y = np.unique(docs[task].to_numpy(dtype=object), return_inverse=True)
    limit = text.row_limit(data, smoke)
    limit = SMOKE_ENTITIES if smoke and (limit is None or limit > SMOKE_ENTITIES) else limit
    rows = text.cap(np.arange(len(docs)), y, limit, stream(seed, HOLDS, 99))
    docs, y = docs.iloc[rows].reset_index(drop=True), y[rows]
    ids = docs["qualname"].to_numpy(dtype=object)
    frames, extra = {}, {}
    for party, modality in parties.items():
        if modality == "text":
            frames[party] = docs["text"].to_numpy(dtype=object)  # vectorised by the party over what it holds
        else:
            frames[party] = np.log1p(code.loc[ids, list(FEATURES)].to_numpy(dtype=np.float64))
            take = stream(seed, EXTRA).choice(len(spare), min(len(spare), int(EXTRA_SHARE * len(ids))), replace=False)
            more = np.sort(spare[take])
            extra[party] = (more, np.log1p(code.loc[more, list(FEATURES)].to_numpy(dtype=np.float64)))
    return ids, frames, y.astype(np.int64), [str(c) for c in classes], extra
