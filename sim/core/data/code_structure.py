"""Code structure of the docstrings corpus's objects, read with ``ast`` from the same installed sources.

Every public module, class, function and method of the eight packages (the walk of
:mod:`sim.core.data.docstrings`, the same qualnames, with or without a docstring) becomes one row of
counts: arguments, defaults, decorators, lines, returns, raises, yields, calls, branches, loops,
nesting depth, ... (FEATURES). Nothing is imported. The table is built once and cached beside the
corpus, named by the package versions and STRUCTURE_VERSION.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from sim.core.data import docstrings

log = logging.getLogger(__name__)

STRUCTURE_VERSION = 1  # bump when FEATURES or the walk change: old caches are then ignored
FEATURES = (
    "args", "posonly", "kwonly", "varargs", "varkw", "defaults", "annotated", "returns_annotated", "decorators",
    "is_async", "bases", "lines", "statements", "returns", "raises", "yields", "calls", "branches", "loops",
    "tries", "withs", "assigns", "nesting", "defs", "lambdas", "comprehensions", "imports", "asserts",
)
_BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try)


def _nesting(node: ast.AST, depth: int = 0) -> int:
    """Deepest nesting of control blocks (if, for, while, with, try) below ``node``."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        deepest = max(deepest, _nesting(child, depth + isinstance(child, _BLOCKS)))
    return deepest


def features(node: ast.AST) -> dict[str, float]:
    """The structure counts of one module, class or function node."""
    nodes = list(ast.walk(node))
    count = lambda *kinds: float(sum(isinstance(n, kinds) for n in nodes))  # noqa: E731
    row = dict.fromkeys(FEATURES, 0.0)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        every = [*a.posonlyargs, *a.args, *a.kwonlyargs]
        row.update(args=len(a.posonlyargs) + len(a.args), posonly=len(a.posonlyargs), kwonly=len(a.kwonlyargs),
                   varargs=float(a.vararg is not None), varkw=float(a.kwarg is not None),
                   defaults=len(a.defaults) + sum(d is not None for d in a.kw_defaults),
                   annotated=sum(x.annotation is not None for x in every),
                   returns_annotated=float(node.returns is not None),
                   is_async=float(isinstance(node, ast.AsyncFunctionDef)))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        row["decorators"] = len(node.decorator_list)
    if isinstance(node, ast.ClassDef):
        row["bases"] = len(node.bases)
    row.update(lines=(getattr(node, "end_lineno", 0) or 0) - (getattr(node, "lineno", 1) or 1) + 1,
               statements=count(ast.stmt), returns=float(sum(isinstance(n, ast.Return) and n.value is not None
                                                              for n in nodes)),
               raises=count(ast.Raise), yields=count(ast.Yield, ast.YieldFrom), calls=count(ast.Call),
               branches=count(ast.If, ast.IfExp), loops=count(ast.For, ast.AsyncFor, ast.While), tries=count(ast.Try),
               withs=count(ast.With, ast.AsyncWith), assigns=count(ast.Assign, ast.AugAssign, ast.AnnAssign),
               nesting=_nesting(node),  # defs below the node (a class's methods), the node itself not counted
               defs=count(ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
               - float(not isinstance(node, ast.Module)),
               lambdas=count(ast.Lambda),
               comprehensions=count(ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp),
               imports=count(ast.Import, ast.ImportFrom), asserts=count(ast.Assert))
    if isinstance(node, ast.Module):
        row["lines"] = max((getattr(n, "end_lineno", 0) or 0) for n in node.body) if node.body else 0
    return {k: float(v) for k, v in row.items()}


def _objects(body: list, prefix: str, in_class: bool) -> Iterator[tuple[str, str, ast.AST]]:
    """(kind, qualname, node) of the public classes, functions and methods of one body (the corpus's walk)."""
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        qualname = f"{prefix}.{node.name}"
        if isinstance(node, ast.ClassDef):
            yield "class", qualname, node
            yield from _objects(node.body, qualname, True)
        else:
            yield ("method" if in_class else "function"), qualname, node


def walk(dist: str, module: str, discipline: str) -> Iterator[dict]:
    """One row per public object of a package: qualname, package, discipline, kind and FEATURES."""
    import importlib.util

    root = Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).parts):
        rel = path.relative_to(root).parts
        if any(d.startswith("_") or d in docstrings.SKIP_DIRS for d in rel[:-1]) or rel[-1] == "conftest.py" \
                or rel[-1].startswith("test_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        stem = () if path.stem == "__init__" else (path.stem,)
        name = ".".join((module, *rel[:-1], *stem))
        for kind, qualname, node in [("module", name, tree), *_objects(tree.body, name, False)]:
            yield {"qualname": qualname, "package": dist, "discipline": discipline, "kind": kind, **features(node)}


def cache_path(cache_dir: str | os.PathLike) -> Path:
    """The cache file for these package versions and this walk."""
    key = json.dumps([STRUCTURE_VERSION, FEATURES, [(d, v) for d, _, v, _ in docstrings.PACKAGES]])
    return Path(cache_dir).expanduser() / f"structure-{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"


def structure(cache_dir: str | os.PathLike = docstrings.DEFAULTS["cache_dir"]) -> pd.DataFrame:
    """Every public object's structure, indexed by qualname (the first of a repeated name), built once and cached."""
    docstrings.check_versions()
    path = cache_path(cache_dir)
    if path.is_file():
        try:
            return pd.read_parquet(path).set_index("qualname")
        except (OSError, ValueError):
            log.warning("code structure cache %s is damaged; rebuilding it", path)
    log.info("reading the code structure of %d packages with ast (once: cached in %s)", len(docstrings.PACKAGES),
             path.parent)
    rows = [row for dist, module, _, discipline in docstrings.PACKAGES for row in walk(dist, module, discipline)]
    df = pd.DataFrame(rows).drop_duplicates("qualname").reset_index(drop=True)
    df[list(FEATURES)] = df[list(FEATURES)].astype(np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return df.set_index("qualname")
