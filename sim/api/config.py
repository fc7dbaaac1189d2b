"""Configs for the Python API: keyword arguments become the command line's overrides, composed the command's way.

Keyword arguments are written as the overrides a user would type (``rounds=5`` -> ``rounds=5``,
``data__alpha=0.1`` and ``data={"alpha": 0.1}`` -> ``data.alpha=0.1``, ``scheme="fedprox"`` ->
``scheme=fedprox``), then composed and checked by `sim.cli.checked`, the very function the
commands' guard runs. So a config from Python has the command line's defaults, its validation and
its one-line errors, and `Config.command` is the command that runs the same thing.
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from sim import cli
from sim.core.types import ConfigError

COMMANDS = {"config": "python -m sim", "compare": "python -m sim.compare", "sweep_main": "python -m sim.sweep"}
"""The command each primary config belongs to."""
PLAIN = re.compile(r"[A-Za-z_][\w./\-]*\Z")
"""A string Hydra reads as that very string without quotes (and not as a number, bool or null)."""
NOT_STRINGS = {"true", "false", "null", "nan", "inf", "none"}


@dataclass(frozen=True, repr=False)
class Config:
    """A composed and checked configuration: what a command with the same overrides would run.

    Made by `sim.compose`; pass it to `sim.run`. It reads like the composed
    config (``config.rounds``, ``config["data"]["alpha"]``) and cannot be changed in place:
    compose another one instead, so that `command` stays true.

    Attributes:
        tree: The composed configuration (a read-only OmegaConf ``DictConfig``), with every default filled in.
        overrides: The overrides it was composed from, in command-line syntax.
        config_dir: The user's config folders searched after ``conf/`` (Hydra search-path entries).
        name: The primary config: ``config`` (one run), ``compare`` or ``sweep_main``.
    """

    tree: DictConfig
    overrides: tuple[str, ...] = ()
    config_dir: tuple[str, ...] = ()
    name: str = "config"

    @property
    def command(self) -> str:
        """The command line that composes the same config, e.g. ``python -m sim rounds=5 scheme=fedprox``."""
        dirs = [f"--config-dir {shlex.quote(e.removeprefix('file://'))}" for e in self.config_dir]
        return " ".join([COMMANDS[self.name], *dirs, *map(shlex.quote, self.overrides)])

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain Python values, interpolations resolved."""
        return OmegaConf.to_container(self.tree, resolve=True)

    def to_yaml(self) -> str:
        """The configuration as YAML (what ``python -m sim --cfg job`` prints)."""
        return OmegaConf.to_yaml(self.tree)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key in ("tree", "overrides", "config_dir", "name"):
            raise AttributeError(key)
        return getattr(self.tree, key)

    def __getitem__(self, key: str) -> Any:
        return self.tree[key]

    def __repr__(self) -> str:
        return f"Config({self.command!r})"


def overrides_of(args: Iterable[str], kwargs: Mapping[str, Any], experiment: str | None = None) -> list[str]:
    """Command-line overrides from override strings, ``experiment`` (``+experiment=NAME``) and keyword arguments.

    A keyword's ``__`` is a dot (``data__alpha``: ``data.alpha``); a dict value stands for its keys one by one
    (``training={"lr": 0.1}``: ``training.lr=0.1``); a string picks a config group's option (``scheme="fedprox"``).
    """
    out = []
    for a in args:
        if not isinstance(a, str) or "=" not in a:
            raise ConfigError("overrides", f"expected strings like 'rounds=5' or 'scheme=fedprox', got {a!r}; pass "
                              "config keys as keywords (rounds=5) or as such strings")
        out.append(a)
    if experiment is not None:
        out.append(f"+experiment={value(experiment, 'experiment')}")
    for key, v in kwargs.items():
        out += _flat(key.replace("__", "."), v)
    return out


def _flat(key: str, v: Any) -> list[str]:
    """``key=value`` overrides for one keyword; a dict gives one per leaf (an empty one says nothing)."""
    if isinstance(v, Mapping):
        return [o for k, sub in v.items() for o in _flat(f"{key}.{k}", sub)]
    return [f"{key}={value(v, key)}"]


def value(v: Any, key: str) -> str:
    """A Python value in Hydra's override grammar: numbers and bools as such, strings quoted where they must be."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple, Mapping)):  # a numpy scalar
        v = v.item()
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        if PLAIN.match(v) and v.lower() not in NOT_STRINGS:
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value(x, key) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{value(x, f'{key}.{k}')}" for k, x in v.items()) + "}"
    raise ConfigError(key, f"expected a number, string, bool, None, list or dict, got {type(v).__name__} {v!r}")


def search_path(config_dir: str | Path | Iterable[str | Path] | None) -> tuple[str, ...]:
    """Search-path entries (``file:///abs``) of the user's config folders, each checked to be a folder."""
    if config_dir is None:
        return ()
    dirs = [config_dir] if isinstance(config_dir, (str, Path)) else list(config_dir)
    return tuple(cli._entry(str(d), "config_dir") for d in dirs)


@contextlib.contextmanager
def searching(entries: tuple[str, ...]) -> Iterator[None]:
    """Make the commands' code search ``entries`` after conf/ for the duration (`sim.cli.SEARCH_PATH`)."""
    before = list(cli.SEARCH_PATH)
    cli.use_search_path(entries)
    try:
        yield
    finally:
        cli.use_search_path(before)


def compose_as(name: str, overrides: list[str], config_dir: tuple[str, ...], check: Callable[..., Any], *,
               with_overrides: bool = False) -> Config:
    """Compose and check the primary config ``name`` as its command's guard does (raises ConfigError)."""
    with searching(config_dir):
        tree = cli.checked(name, overrides, check, with_overrides=with_overrides)
    OmegaConf.set_readonly(tree, True)
    return Config(tree=tree, overrides=tuple(overrides), config_dir=config_dir, name=name)
