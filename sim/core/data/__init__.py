"""Datasets and how they are split among institutions.

``build_federation(data, scenario, seed)`` turns the ``data`` config group into one shard
per institution (its own train and test split) plus the global test set, the union of
the institutions' test splits in scenario order. ``check_data`` runs the same
validation cheaply before any actor starts. Datasets: ``synthetic`` (FedProx/LEAF
generator, disciplines as clusters), ``digits`` (scikit-learn), ``table`` (the user's
CSV or Parquet file), and two text datasets: ``text`` (the user's file with a text column)
and ``docstrings`` (a corpus read from eight scientific packages); ``partition.py`` holds
the partitioners.

Text datasets need a transformer model (``model``, a factory of sim.core.models.foundation):
their builders return texts, which are tokenised here once, with that model's tokenizer,
into int64 token ids of shape (max_length,); they take no feature skew.

Every dataset takes ``val_fraction``: that share of each institution's training rows is
held out as its validation split (drawn from its own stream, after the train/test split,
so test splits do not move), for model selection (``results.select=best_val``); the
global validation set is their union.

An institution's ``feature_skew`` adds one fixed Gaussian shift (that std, one value per
input element, drawn from its own stream) to all its inputs, train and test: its
instruments read differently, after labels are fixed.

Data-side behaviours (``noisy_labels``, ``data_poisoning``: :mod:`sim.core.data.corruption`) change a
misbehaving institution's training split only, last, from its own stream: its test and
validation splits, and so the global test set, stay honest.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from sim.core.data import corruption, digits, docstrings, public, synthetic, table, text, views
from sim.core.data.partition import FEATURE_SKEW, MIN_TRAIN, PARTITIONS, VALIDATION, Pool, check_sizes, num_test, stream
from sim.core.types import ConfigError, Federation, Scenario, Shard, listing

DATASETS: dict[str, Callable[..., Pool]] = {
    "synthetic": synthetic.build,
    "digits": digits.build,
    "table": table.build,
    "text": text.build,
    "docstrings": docstrings.build,
}
"""Registry: dataset name (= yaml file in conf/data/) -> builder(data, scenario, seed, smoke) -> Pool."""

_MODULES = {"synthetic": synthetic, "digits": digits, "table": table, "text": text, "docstrings": docstrings}
TEXT = ("text", "docstrings")  # datasets whose samples are texts, tokenised once by build_federation
COMMON = {"val_fraction": 0.15, "public": None}
"""Keys every dataset takes (handled here, not by the builders)."""


def defaults(name: str) -> dict:
    """The keys a dataset takes and their defaults (mirrors conf/data/<name>.yaml)."""
    return dict(_MODULES[name].DEFAULTS) | COMMON


def _resolve(data: Mapping) -> dict:
    """The data config with defaults filled in; unknown dataset or key raises ConfigError."""
    name = data.get("name")
    if name not in DATASETS:
        raise ConfigError("data.name", f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    known = _MODULES[name].DEFAULTS | COMMON
    for key in data:
        if key not in known and not str(key).startswith("_"):  # _target_ and friends belong to Hydra
            raise ConfigError(f"data.{key}", f"unknown key for dataset '{name}'; known keys: {', '.join(known)}")
    return {**known, **data}


def _check_scenario(scenario: Scenario) -> None:
    """The scenario facts the data depend on: names, shares, skews."""
    specs = scenario.institutions
    if not specs:
        raise ConfigError("scenario.institutions", "no institutions; list at least one")
    names = [i.name for i in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError("scenario.institutions", f"institution names must be unique; repeated: {', '.join(dup)}")
    for i in specs:
        if not i.share > 0:
            raise ConfigError("scenario.institutions", f"'{i.name}' has share {i.share}; shares must be > 0")
        if i.label_skew is not None and not i.label_skew > 0:
            raise ConfigError("scenario.institutions", f"'{i.name}' has label_skew {i.label_skew}; "
                              "it is a Dirichlet alpha and must be > 0 (or null for none)")
        if not i.feature_skew >= 0:
            raise ConfigError("scenario.institutions", f"'{i.name}' has feature_skew {i.feature_skew}; must be >= 0")
    total = sum(i.share for i in specs)
    if total > 1 + 1e-3:  # the slack sim.core.scenario allows for hand-typed shares; pools rescale them to fit
        raise ConfigError("scenario.institutions", f"shares sum to {total:.4f}; they must sum to at most 1")


def check_data(data: Mapping, scenario: Scenario, model: Mapping | None = None) -> None:
    """Validate the data config against the scenario (and the model, when given); raises ConfigError(key, problem)."""
    cfg = _resolve(data)
    if model is not None and cfg["name"] in TEXT and not views.uses_views(cfg):  # views: numeric bottoms (hashed text)
        text.check_model(cfg["name"], model)
    _check_scenario(scenario)
    if cfg["partition"] not in PARTITIONS:
        raise ConfigError("data.partition", f"unknown partition '{cfg['partition']}'; "
                          f"choose one of {', '.join(PARTITIONS)}")
    tf = cfg["test_fraction"]
    if not isinstance(tf, (int, float)) or isinstance(tf, bool) or not 0 < tf < 1:
        raise ConfigError("data.test_fraction", f"must be between 0 and 1 (exclusive), got {tf!r}")
    vf = cfg["val_fraction"]
    if not isinstance(vf, (int, float)) or isinstance(vf, bool) or not 0 <= vf < 1:
        raise ConfigError("data.val_fraction", f"must be at least 0 and below 1, got {vf!r}")
    public.settings(cfg)
    if views.uses_views(cfg):  # different views of the same entities (sim.vertical builds them, not build_federation)
        views.check(cfg, scenario)
        return
    _MODULES[cfg["name"]].check(cfg, scenario)


def build_federation(data: Mapping, scenario: Scenario, seed: int, *, smoke: bool = False,
                     model: Mapping | None = None) -> Federation:
    """Load the dataset named by data.name and give every institution its train and test shard."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", f"must be an integer >= 0, got {seed!r}")
    cfg = _resolve(data)
    is_text = cfg["name"] in TEXT
    if is_text:  # before any corpus is read: a numeric model cannot take token ids
        text.check_model(cfg["name"], model)
    check_data(data, scenario)
    pool = DATASETS[cfg["name"]](cfg, scenario, int(seed), smoke)
    if is_text:  # every row once, with the model's own tokenizer
        pool = pool._replace(x=text.tokenize(pool.x, model, cfg["max_length"]))
    check_sizes(scenario.names, [len(tr) for tr, _ in pool.parts], [len(te) for _, te in pool.parts],
                "scenario.institutions", "raise its share or give the dataset more samples")
    shared, pool_parts = None, pool.parts
    if (wanted := public.settings(cfg)) is not None:  # before validation rows: those stay each institution's own
        shared, pool_parts = public.carve(pool.parts, wanted[1], int(seed), scenario)
    parts = [(*hold_out(train, cfg["val_fraction"], seed, spec.index, spec.name), test)
             for spec, (train, test) in zip(scenario.institutions, pool_parts)]
    _check_behaviours(scenario.institutions, pool.x.shape[1:], int(pool.num_classes), is_text)
    shards = []
    for spec, (train, val, test) in zip(scenario.institutions, parts):
        xs = [pool.x[rows] for rows in (train, val, test)]  # fancy indexing copies: shards never alias
        if spec.feature_skew > 0 and not is_text:  # check_data refuses feature skew for token ids
            rng = stream(seed, FEATURE_SKEW, spec.index)
            shift = rng.normal(0.0, spec.feature_skew, size=pool.x.shape[1:]).astype(np.float32)
            xs = [x + shift for x in xs]
        dtype = np.int64 if is_text else np.float32  # token ids stay integers
        x_train, x_val, x_test = (x.astype(dtype, copy=False) for x in xs)
        y_train = pool.y[train].astype(np.int64)
        if spec.behaviour in corruption.DATA_BEHAVIOURS:
            x_train, y_train = corruption.corrupt(spec, x_train, y_train, int(pool.num_classes), seed)
        shards.append(Shard(spec.name, x_train, y_train, x_test, pool.y[test].astype(np.int64),
                            x_val, pool.y[val].astype(np.int64)))
    return Federation(
        shards=tuple(shards),
        x_test=np.concatenate([s.x_test for s in shards]),
        y_test=np.concatenate([s.y_test for s in shards]),
        input_shape=tuple(int(d) for d in pool.x.shape[1:]),
        num_classes=int(pool.num_classes),
        x_val=np.concatenate([s.x_val for s in shards]),
        y_val=np.concatenate([s.y_val for s in shards]),
        # inputs only, as the pool holds them (no institution's feature shift); their labels go nowhere
        x_public=None if shared is None else pool.x[shared].astype(np.int64 if is_text else np.float32, copy=False),
    )


def _check_behaviours(specs, shape: tuple[int, ...], num_classes: int, is_text: bool) -> None:
    """Data poisoners' triggers and targets must fit the data; raises ConfigError naming every institution that
    does not (the key of the first)."""
    poisoners = [s for s in specs if s.behaviour == "data_poisoning"]
    if not poisoners:
        return
    key = lambda s, field: f"scenario.institutions[{s.index}].{field}"  # noqa: E731
    if is_text:
        raise ConfigError(key(poisoners[0], "behaviour"), "data_poisoning sets input features, which token ids are "
                          f"not; use it with a numeric dataset ({len(poisoners)} institution(s) poison their data)")
    width = int(np.prod(shape))
    for field, bad, limit in (("target_label", [s for s in poisoners if s.target_label >= num_classes],
                               f"the data has {num_classes} classes (0..{num_classes - 1})"),
                              ("trigger_features", [s for s in poisoners if s.trigger_features > width],
                               f"an input has {width} elements")):
        if bad:
            each = listing(f"'{s.name}' ({getattr(s, field)})" for s in bad)
            raise ConfigError(key(bad[0], field), f"is {getattr(bad[0], field)} but {limit}: {len(bad)} "
                              f"institution(s) set it out of range: {each}")


def hold_out(train: np.ndarray, fraction: float, seed: int, index: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Split an institution's training rows into (train, validation): ``fraction`` of them, drawn from its own stream.

    Rows keep their order within each part. Raises ConfigError when what is left cannot train
    or a positive fraction leaves no validation row.
    """
    k = num_test(len(train), fraction) if fraction > 0 else 0
    if fraction > 0 and k == 0:
        raise ConfigError("data.val_fraction", f"institution '{name}' has {len(train)} training rows, too few to hold "
                          f"out {fraction:g} of them for validation; raise data.val_fraction or set it to 0 "
                          "(with results.select=last)")
    if len(train) - k < MIN_TRAIN:
        raise ConfigError("data.val_fraction", f"holding out {fraction:g} of institution '{name}''s {len(train)} "
                          f"training rows for validation leaves {len(train) - k}; it needs at least {MIN_TRAIN} "
                          "to train: lower data.val_fraction")
    val = np.zeros(len(train), dtype=bool)
    val[stream(seed, VALIDATION, index).choice(len(train), size=k, replace=False)] = True
    return train[~val], train[val]


def sites_from_table(data: Mapping) -> list[tuple[str, str, int]]:
    """(institution, discipline, n_rows) for each site of a table under partition natural."""
    return table.sites_from_table(_resolve(data))


__all__ = ["DATASETS", "build_federation", "check_data", "defaults", "sites_from_table"]
