"""Real text from eight scientific Python packages: the first paragraph of every public docstring.

Each package is an institution of its own discipline (PACKAGES). Its .py files are read
with ``ast``, never imported, from the installed, pinned releases (``pip install
'collabsim[corpus]'``), so every machine builds the same rows. Public means no directory
below the package and no class or function name starts with "_"; module files may
(``sklearn/linear_model/_base.py`` is where sklearn's public API lives). tests/ and
conftest are skipped, texts under MIN_CHARS dropped, and a text kept once: the first in a
sorted walk, and not at all when two packages share it (about 21,000 rows).

The corpus is built once (well under a minute) into a Parquet file under
``data.cache_dir`` named by a digest of the package versions and BUILDER_VERSION; the
sha256 of its rows sits in the file's metadata and is checked on every read, and a
damaged file is rebuilt. Three tasks (``data.task``): ``subpackage`` (each institution
labels its own package's docstrings by subpackage; natural partition only), ``discipline``
(one label space, the package's discipline; rows spread by iid, dirichlet or quantity) and
``kind`` (one label space, whether a docstring is a class's, a function's, a method's or a
module's; natural, so each package keeps its own mix and size, or spread like discipline).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sim.core.data import text
from sim.core.data.partition import PARTITION, Pool, check_partition, check_sizes, natural, partition, stream
from sim.core.types import ConfigError, Scenario

log = logging.getLogger(__name__)

DEFAULTS = {
    "name": "docstrings",
    "task": "kind",
    "partition": "natural",
    "test_fraction": 0.2,
    "dirichlet_alpha": 0.5,
    "quantity_exponent": 1.5,
    "max_length": 32,
    "max_rows_per_institution": 400,
    "size_exponent": None,
    "min_class_rows": 30,
    "cache_dir": "~/.cache/collabsim",
    "views": None,  # sim.core.data.views: {institution: text | code}, the same objects as text and as code structure
    "label_holder": None,
    "overlap": 1.0,
}
TASKS = ("subpackage", "discipline", "kind")
NATURAL = ("subpackage", "kind")  # tasks whose rows may go to the institution named like their package
PACKAGES = (  # (distribution = institution, import name, pinned version, discipline)
    ("scipy", "scipy", "1.17.1", "scientific computing"),
    ("statsmodels", "statsmodels", "0.15.0", "statistics"),
    ("sympy", "sympy", "1.14.0", "symbolic mathematics"),
    ("networkx", "networkx", "3.6.1", "network science"),
    ("astropy", "astropy", "8.0.2", "astronomy"),
    ("biopython", "Bio", "1.88", "biology"),
    ("scikit-image", "skimage", "0.26.0", "imaging"),
    ("scikit-learn", "sklearn", "1.9.1", "machine learning"),
)
BUILDER_VERSION = 1  # bump when the walk or the text rules change: old caches are then ignored
COLUMNS = ("package", "discipline", "subpackage", "kind", "qualname", "text")
MIN_CHARS = 20  # shorter first paragraphs are mostly "Constructor." or "See above."
TOP = "(top)"  # subpackage of the modules directly in the package folder
OTHER = "(other)"  # subpackages with fewer than data.min_class_rows rows, merged
SKIP_DIRS = ("tests", "test")
DIGEST_KEY = b"collabsim.rows_sha256"
INSTALL = "pip install 'collabsim[corpus]'"


def check_versions(packages: Sequence[tuple] | None = None) -> None:
    """Each package (default: all of PACKAGES) is installed at its pinned version, else ConfigError(data.name)."""
    for dist, module, pinned, _ in packages or PACKAGES:
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found != pinned or importlib.util.find_spec(module) is None:
            have = "is not installed" if found is None else f"is {found}"
            raise ConfigError("data.name", f"data=docstrings reads {dist}=={pinned} but it {have}, so the corpus "
                              f"would differ between machines; {INSTALL}")


def _first_paragraph(doc: str | None) -> str:
    """The text up to the first blank line, whitespace-normalised."""
    return " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split()) if doc else ""


def _definitions(body: list, prefix: str, in_class: bool) -> Iterator[tuple[str, str, str | None]]:
    """(kind, qualname, docstring) of the public classes, functions and methods of one body."""
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        qualname = f"{prefix}.{node.name}"
        if isinstance(node, ast.ClassDef):
            yield "class", qualname, ast.get_docstring(node)
            yield from _definitions(node.body, qualname, True)
        else:
            yield ("method" if in_class else "function"), qualname, ast.get_docstring(node)


def _walk(module: str) -> Iterator[tuple[str, str, str, str]]:
    """(subpackage, kind, qualname, first paragraph) of each public docstring of a package, in sorted order."""
    root = Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).parts):
        rel = path.relative_to(root).parts
        if any(d.startswith("_") or d in SKIP_DIRS for d in rel[:-1]) or rel[-1] == "conftest.py" \
                or rel[-1].startswith("test_"):
            continue
        try:
            with warnings.catch_warnings():  # old escape sequences in docstrings warn; they parse fine
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a file for another Python version: not part of the corpus
            continue
        stem = () if path.stem == "__init__" else (path.stem,)
        name = ".".join((module, *rel[:-1], *stem))
        sub = rel[0] if len(rel) > 1 else TOP
        for kind, qualname, doc in [("module", name, ast.get_docstring(tree)), *_definitions(tree.body, name, False)]:
            paragraph = _first_paragraph(doc)
            if len(paragraph) >= MIN_CHARS:
                yield sub, kind, qualname, paragraph


def build_corpus(packages: Sequence[tuple] = PACKAGES) -> pd.DataFrame:
    """Walk the packages and return the de-duplicated corpus (columns COLUMNS), without any cache."""
    rows = []
    for k, (dist, module, _, discipline) in enumerate(packages, 1):  # a minute or so: say where it is
        log.info("docstrings corpus: reading %s (%d/%d)", dist, k, len(packages))
        rows += [(dist, discipline, *row) for row in _walk(module)]
    owners: dict[str, set[str]] = {}
    for row in rows:
        owners.setdefault(row[-1], set()).add(row[0])
    seen: set[str] = set()
    kept = []
    for row in rows:  # a text two packages share says nothing about either; within one, keep the first
        if len(owners[row[-1]]) == 1 and row[-1] not in seen:
            seen.add(row[-1])
            kept.append(row)
    return pd.DataFrame(kept, columns=list(COLUMNS))


def rows_digest(df: pd.DataFrame) -> str:
    """sha256 of the rows (every column, in order): what the cache file must still hold."""
    h = hashlib.sha256()
    for row in df[list(COLUMNS)].itertuples(index=False):
        h.update("\x1f".join(row).encode() + b"\x1e")
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike, packages: Sequence[tuple] = PACKAGES) -> Path:
    """The cache file for these package versions and this builder."""
    key = json.dumps([BUILDER_VERSION, [(dist, pinned) for dist, _, pinned, _ in packages]])
    return Path(cache_dir).expanduser() / f"docstrings-{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"


def _read(path: Path) -> pd.DataFrame | None:
    """The cached corpus, or None when the file is missing or its rows do not match their digest."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        df = table.to_pandas()
        stored = (table.schema.metadata or {}).get(DIGEST_KEY, b"").decode()
        if list(df.columns) == list(COLUMNS) and stored == rows_digest(df):
            return df
    except (OSError, ValueError, TypeError, pa.ArrowException):  # a truncated or foreign file
        pass
    log.warning("docstrings corpus cache %s is damaged; rebuilding it", path)
    return None


def corpus(cache_dir: str | os.PathLike = DEFAULTS["cache_dir"], packages: Sequence[tuple] = PACKAGES) -> pd.DataFrame:
    """The corpus from its cache, built (and cached) first if the cache is missing or damaged."""
    check_versions(packages)
    path = cache_path(cache_dir, packages)
    df = _read(path)
    if df is not None:
        return df
    start = time.perf_counter()
    log.info("building the docstrings corpus from %d installed packages (once: it is cached in %s)", len(packages),
             path.parent)
    df = build_corpus(packages)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), DIGEST_KEY: rows_digest(df).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    log.info("built the docstrings corpus: %d rows in %.1fs -> %s", len(df), time.perf_counter() - start, path)
    return df


def labels(df: pd.DataFrame, data: Mapping) -> tuple[np.ndarray, list[str]]:
    """Each row's label id and the label names (sorted) under data.task."""
    if data["task"] in ("discipline", "kind"):  # one label space: the column of that name
        names = df[data["task"]].to_numpy(dtype=object)
    else:
        modules = {dist: module for dist, module, _, _ in PACKAGES}
        names = np.array([f"{modules.get(p, p)}.{s}" for p, s in zip(df["package"], df["subpackage"])], dtype=object)
        values, counts = np.unique(names, return_counts=True)
        small = set(values[counts < data["min_class_rows"]])
        names = np.array([f"{n.split('.')[0]}.{OTHER}" if n in small else n for n in names], dtype=object)
    classes, ids = np.unique(names, return_inverse=True)
    return ids.astype(np.int64), [str(c) for c in classes]


def own_label_spaces(data: Mapping) -> bool:
    """Whether ``data`` gives each institution a label space of its own (data=docstrings under task=subpackage)."""
    return data.get("name") == "docstrings" and data.get("task", DEFAULTS["task"]) == "subpackage"


def _check_keys(data: Mapping, scenario: Scenario) -> None:
    """task, partition and min_class_rows make sense together and with the scenario."""
    task, part = data["task"], data["partition"]
    if task not in TASKS:
        raise ConfigError("data.task", f"unknown task {task!r}; choose subpackage, discipline or kind")
    if task == "subpackage" and part != "natural":
        raise ConfigError("data.partition", "task=subpackage gives each package's docstrings to the institution "
                          "named like it, so the partition must be natural (or use data.task=discipline)")
    if task == "discipline" and part == "natural":
        raise ConfigError("data.partition", "task=discipline with partition=natural gives each institution one "
                          "class, its package's discipline; choose iid, dirichlet or quantity")
    m = data["min_class_rows"]
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ConfigError("data.min_class_rows", f"must be a whole number >= 1, got {m!r}")
    if part == "natural":  # subpackage or kind: each package's rows go to the institution named like it
        known = [dist for dist, _, _, _ in PACKAGES]
        which = "task=subpackage" if task == "subpackage" else "task=kind with partition=natural"
        other = "" if task == "subpackage" else ", or spread the rows over any institutions with data.partition=iid, " \
                                                "dirichlet or quantity"
        for spec in scenario.institutions:
            if spec.name not in known:
                raise ConfigError(f"scenario.institutions[{spec.index}].name", f"'{spec.name}' of scenario={scenario.name} "
                                  f"is no package; {which} needs institutions named {', '.join(known)}: use "
                                  f"scenario=docstrings (data=docstrings picks it unless a scenario is named){other}")


def _pool(data: Mapping, scenario: Scenario, seed: int, smoke: bool) -> Pool:
    """The corpus split among the institutions (texts, not yet token ids)."""
    df = corpus(data["cache_dir"])
    own = data["partition"] == "natural"  # subpackage or kind (the checked keys allow nothing else)
    if own:  # label ids over the scenario's packages only: no class nobody holds
        df = df[df["package"].isin(scenario.names)].reset_index(drop=True)
    y, classes = labels(df, data)
    limit = text.row_limit(data, smoke)
    if own:
        shards = natural(df["package"].to_numpy(), scenario.names)
        each = sized([len(s) for s in shards], data["max_rows_per_institution"], data.get("size_exponent"))
        if isinstance(each, list):  # sized caps; the smoke cap is a ceiling on them, not what they scale
            limit = [min(n, text.SMOKE_ROWS) for n in each] if smoke else each
        hint = ("data.min_class_rows", "lower data.min_class_rows so fewer subpackages merge into one class") \
            if data["task"] == "subpackage" else ("data.max_rows_per_institution", "raise it (or null for all rows)")
    else:
        shards = partition(y, len(classes), data, scenario, stream(seed, PARTITION))
        hint = ("data.partition", "use partition=iid or a larger data.dirichlet_alpha")
    # kind over packages: one shared label space, so every institution's test split holds each of its kinds
    stratify = own and data["task"] == "kind"
    parts = text.finish(shards, y, None, data, scenario, seed, limit, classes, hint, stratify=stratify)
    if stratify:
        _check_every_class(shards, parts, y, classes, scenario, limit)
    return text.compact(df["text"].to_numpy(dtype=object), y, parts, len(classes))


def sized(rows: Sequence[int], limit: int | None, exponent: float | None) -> int | list[int] | None:
    """Each institution's cap: ``limit`` alone (exponent None: every institution above it keeps ``limit``, so sizes
    even out), or ``limit * (rows / most rows) ** exponent``, which keeps the corpus's order of sizes (1: its
    proportions; 0.5: compressed, so the smallest still has enough rows to learn from)."""
    if exponent is None or limit is None or not rows:
        return limit
    top = max(rows)
    return [min(n, max(1, round(limit * (n / top) ** float(exponent)))) for n in rows]


def _check_every_class(shards: Sequence[np.ndarray], parts: Sequence[tuple[np.ndarray, np.ndarray]], y: np.ndarray,
                       classes: Sequence[str], scenario: Scenario, limit: int | list[int] | None) -> None:
    """Each class an institution holds in the corpus keeps rows in its train and its test split, else ConfigError
    naming the institution and the class: a cap so small that a kind drops out of a split would score (or train)
    that institution on fewer kinds than its peers, and the shared label space would no longer be shared."""
    limits = limit if isinstance(limit, list) else [limit] * len(shards)
    for spec, idx, (train, test), limit in zip(scenario.institutions, shards, parts, limits):
        for c in np.unique(y[idx]):
            kept = int(np.sum(y[train] == c)), int(np.sum(y[test] == c))
            if min(kept) > 0:
                continue
            split, missing, fix = ("test", "never scored on", "raise") if kept[1] == 0 else \
                ("train", "never trained on", "lower")
            name, total = classes[c], int(np.sum(y[idx] == c))
            if limit is not None and limit < len(idx):
                raise ConfigError("data.max_rows_per_institution", f"capped at {limit} rows, institution "
                                  f"'{spec.name}' keeps {sum(kept)} of its {total} {name!r} docstrings and none in its "
                                  f"{split} split, so it is {missing} that kind; raise "
                                  "data.max_rows_per_institution (or null for all rows)")
            raise ConfigError("data.test_fraction", f"institution '{spec.name}' has {total} {name!r} docstrings and "
                              f"none in its {split} split; {fix} data.test_fraction")


def check(data: Mapping, scenario: Scenario) -> None:
    """Validate the keys, the installed versions and (reading the cached corpus) every institution's rows."""
    _check_keys(data, scenario)  # first: a natural task with another scenario's institutions names scenario=docstrings
    text.check_common(data, scenario)
    check_versions()
    if data["partition"] != "natural":
        check_partition(data, scenario, len(corpus(data["cache_dir"])))
        return
    pool = _pool(data, scenario, seed=0, smoke=False)  # natural: sizes and classes do not depend on the seed
    check_sizes(scenario.names, [len(tr) for tr, _ in pool.parts], [len(te) for _, te in pool.parts],
                "data.max_rows_per_institution", "raise it (or null for all rows)")


def build(data: Mapping, scenario: Scenario, seed: int, smoke: bool = False) -> Pool:
    """Split the docstrings corpus among the institutions under data.task; x holds the texts."""
    return _pool(data, scenario, seed, smoke)
