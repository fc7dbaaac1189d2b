"""Command-line guard: check the command's config the way Hydra will compose it, before anything runs.

Hydra reports a bad override as a multi-line message with a hint about stack traces.
Users get one line naming the key and the fix instead, and exit status 2, before Ray
or any actor starts. Sweep overrides (``-m scheme=a,b``) are checked value by value.

A user's own config files live in folders of their own, laid out like conf/
(``DIR/scenario/mysites.yaml``, ``DIR/scheme/x.yaml``, ``DIR/sweep/mine.yaml``) and named
on the command line with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``, as
Hydra takes them. Hydra's own loading sees them; the guard, :func:`compose` and
:func:`group_options` see them through :data:`SEARCH_PATH`, which the guard sets from the
command line, so the pre-run checks, compare's per-scheme configs and a sweep's trials
find them too.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import gc
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from omegaconf import DictConfig

from sim.core.types import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MULTIRUN = {"-m", "--multirun"}
MODE_KEYS = {"hydra.mode", "hydra/sweeper", "hydra/launcher"}  # an override that may set Hydra's run mode
PASSTHROUGH = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion", "-sc", "--version"}
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
VALUE_FLAGS = (*CONFIG_DIR_FLAGS, "--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun")
"""Hydra's flags that take a value, which may come as the next argument (``--config-dir DIR``)."""
SEARCH_PATH: list[str] = []
"""The user's config folders as Hydra search-path entries (``file:///abs/dir``, ``pkg://module``), searched after
conf/ in this order, as Hydra searches them. Module-level on purpose: compare composes its per-scheme configs
through :func:`compose` from code that does not see the command line; :func:`use_search_path` sets it once, at
start. A sweep's trials run in other processes and get it as an override (``sim.sweep.base_overrides``)."""


def fail(message: str) -> None:
    """Print one error line and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def launch(main: Callable[[], None], config_name: str, check: Callable[..., Any], *, with_overrides: bool = False,
           more_argv: Callable[[list[str]], list[str]] | None = None, early: Callable[[Any], None] | None = None) -> None:
    """A command from start to end: its config checked as Hydra will compose it (:func:`guard`), a used
    ``hydra.run.dir`` refused before Hydra writes into it, ``more_argv(overrides)`` appended to the command line
    (``resume=DIR``'s own), ``early(what check returned)`` for a command of one config (not ``-m``), Hydra's
    ``main`` run, then :func:`finish`. Bad input: one line, exit status 2."""
    from sim.core.rundir import check_argv

    checks = guard(config_name, sys.argv[1:], check, with_overrides=with_overrides)
    try:
        argv = without_flags(sys.argv[1:])  # --config-dir DIR's DIR is no override
        check_argv(argv)
        if more_argv is not None:
            sys.argv += more_argv(argv)
        if early is not None and len(checks) == 1 and not MULTIRUN.intersection(sys.argv[1:]):
            early(checks[0])
    except ConfigError as e:
        fail(str(e))
    # What start-up made (torch's, pandas', Ray's and Hydra's objects, millions of them) lives until exit: frozen, a
    # full garbage collection no longer walks it every time (at 10,000 institutions, 120-180 ms a collection,
    # several in a run).
    gc.freeze()
    with _known_mode(sys.argv[1:]):
        main()
    finish()


@contextlib.contextmanager
def _known_mode(argv: list[str]) -> Iterator[None]:
    """While Hydra runs the command: where its run mode is known, Hydra does not compose the config once more to read
    it. Hydra composes a command's config, only to read ``hydra.mode``, before composing it again to run it
    (``Hydra.get_mode``: about 0.1 s); when that says nothing it runs one job, or a sweep under ``-m``. No config of
    conf/ sets ``hydra.mode``, so where neither the command line nor a config folder of the user's can, the answer
    (nothing) is known. Elsewhere, or with a Hydra that probes otherwise, Hydra probes as it always does."""
    try:
        from hydra._internal.hydra import Hydra
    except ImportError:
        Hydra = None
    probe = getattr(Hydra, "get_mode", None)
    if probe is None or SEARCH_PATH or any(_key(a) in MODE_KEYS for a in argv):
        yield
        return
    Hydra.get_mode = lambda self, config_name, overrides: None  # what the probe returns for conf/'s configs
    try:
        yield
    finally:
        Hydra.get_mode = probe


def finish(code: int = 0) -> None:
    """End a command quickly, with exit status ``code``, once everything it writes is written and printed.

    The local Ray cluster the command started ends at once (Ray's exit hook waits half a second
    first); then the exit hooks run and the process ends without the interpreter's teardown, which
    frees, one by one, every object torch, pandas and Ray made (0.15-0.3 s of a command's end, for
    nothing the command still needs). Where a thread not the command's own is still working, Python
    ends the process as usual, skipping only its last garbage collection over what start-up made
    (``gc.freeze``; ~0.4 s here).
    """
    if "agents.runtime.cluster" in sys.modules:  # only a command that imported it can have started Ray
        from agents.runtime.cluster import disconnect

        disconnect()
    if "sim.core.checkpoint" in sys.modules:
        from sim.core.checkpoint import stop_writing

        stop_writing()  # every checkpoint is written by now: its idle thread ends
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        gc.freeze()  # Python's own exit follows: its last collection skips what start-up made
        return
    atexit._run_exitfuncs()  # what registered an exit hook (Ray, tracking backends, temporary folders) still runs it
    logging.shutdown()  # log files flushed and closed
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (``| head``) or stream: nothing left to say
            stream.flush()
    os._exit(code)


def group_options(group: str) -> list[str]:
    """Config names available in a group folder of conf/ and of the user's config folders."""
    return sorted({p.stem for folder in config_folders() for p in (folder / group).glob("*.yaml")})


def config_folders() -> list[Path]:
    """conf/, then the user's config folders that are folders on disk (``file://`` entries of the search path)."""
    return [CONF_DIR, *(Path(e.removeprefix("file://")) for e in SEARCH_PATH if e.startswith("file://"))]


def hidden_files() -> list[tuple[Path, Path]]:
    """(user file, conf/ file) pairs where a user's config file has a built-in one's group and name, so Hydra never reads it."""
    return [(p, CONF_DIR / p.relative_to(folder)) for folder in config_folders()[1:] if folder != CONF_DIR
            for p in sorted([*folder.glob("*.yaml"), *folder.glob("*/*.yaml")])  # the primary config and groups
            if (CONF_DIR / p.relative_to(folder)).is_file()]


def use_search_path(entries: Iterable[str]) -> None:
    """Make :func:`compose` and :func:`group_options` search these entries after conf/ (see :data:`SEARCH_PATH`)."""
    SEARCH_PATH[:] = list(dict.fromkeys(entries))


def command_line(argv: list[str]) -> tuple[list[str], list[str]]:
    """(config overrides, user search path) of a command line; Hydra's flags and ``hydra.*`` overrides left out.

    The search path is every ``--config-dir DIR`` (``-cd``), then the entries of
    ``hydra.searchpath=[...]``, each checked to exist (raises ConfigError).
    """
    overrides, dirs, listed = [], [], []
    args = iter(argv)
    for a in args:
        flag, eq, value = a.partition("=")
        if flag in VALUE_FLAGS:
            value = value if eq else next(args, "")
            if flag in CONFIG_DIR_FLAGS:
                dirs.append(_entry(value, flag))
        elif a.startswith("-"):
            continue
        elif _key(a) == "hydra.searchpath":
            listed = searchpath_entries(a)
        elif not _key(a).startswith(("hydra.", "hydra/")):
            overrides.append(a)
    return overrides, [*dirs, *listed]


def without_flags(argv: list[str]) -> list[str]:
    """The command line without Hydra's flags and their values (``--config-dir DIR``, ``-m``): overrides only."""
    out, args = [], iter(argv)
    for a in args:
        if a in VALUE_FLAGS:
            next(args, None)
        elif not a.startswith("-"):
            out.append(a)
    return out


def searchpath_entries(override: str) -> list[str]:
    """The entries of a ``hydra.searchpath=[...]`` override, folders made absolute (raises ConfigError)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001 - a malformed override becomes one line
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("hydra.searchpath", f"expected a list of folders like [file:///path/to/my_conf], got "
                          f"{override.partition('=')[2]!r}")
    return [_entry(v, "hydra.searchpath") for v in value]


def searchpath_override(entries: Iterable[str]) -> str:
    """The ``hydra.searchpath=[...]`` override that lists ``entries`` (quoted, so any path survives)."""
    quoted = ("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in entries)
    return f"hydra.searchpath=[{','.join(quoted)}]"


def _entry(where: str, key: str) -> str:
    """One search-path entry: a folder (``DIR`` or ``file://DIR``) as ``file:///abs/DIR``; ``pkg://`` kept as written."""
    if "://" in where and not where.startswith("file://"):
        return where
    path = Path(os.path.abspath(os.path.expanduser(where.removeprefix("file://")))) if where else None
    if path is None or not path.is_dir():
        raise ConfigError(key, f"{where!r} is not a folder; give a folder laid out like conf/ (e.g. DIR/scenario/mine.yaml)")
    return f"file://{path}"


def guard(config_name: str, argv: list[str], check: Callable[..., Any], *, with_overrides: bool = False) -> list[Any]:
    """Compose ``config_name`` with the command's overrides and run ``check``; one line and exit 2 on error; return
    what ``check`` returned for each combination (none for Hydra's own flags, ``--help`` and the like).

    Sets the user's search path (:func:`use_search_path`) from ``argv`` first. ``check`` gets the
    composed config, and with ``with_overrides`` also the overrides it was composed from (one
    value of each sweep at a time).
    """
    try:
        overrides, entries = command_line(argv)
    except ConfigError as e:
        fail(str(e))
    use_search_path(entries)
    for mine, builtin in hidden_files():
        print(f"warning: {mine} is hidden by {builtin} (conf/ is searched first); give yours a name of its own",
              file=sys.stderr)
    if any(a.split("=")[0] in PASSTHROUGH for a in argv):
        return []
    results: list[Any] = []

    def kept(*args: Any) -> None:
        results.append(check(*args))

    try:
        for combo in _combinations(overrides):
            checked(config_name, combo, kept, with_overrides=with_overrides)
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - a malformed override becomes one line
        fail(explain(e))
    return results


def checked(config_name: str, overrides: list[str], check: Callable[..., None], *,
            with_overrides: bool = False) -> DictConfig:
    """Compose ``config_name`` with ``overrides`` and run ``check`` on it; return the config.

    Raises ConfigError whose text is the very line the command prints after ``error:`` (the guard runs this for
    each combination of a sweep; the Python API, :mod:`sim.api`, raises it as it is).
    """
    try:
        cfg = compose(config_name, overrides)
        if with_overrides:
            check(cfg, overrides)
        else:
            check(cfg)
    except ConfigError as e:
        where = _user_file(e.key, overrides)
        if not where:
            raise
        raise ConfigError(e.key, e.problem + where) from None
    except Exception as e:  # noqa: BLE001 - any composition error becomes one line
        line = explain(e)
        key, sep, problem = line.partition(": ")
        raise (ConfigError(key, problem) if sep else ConfigError("config", line)) from None
    return cfg


def _user_file(key: str, overrides: list[str]) -> str:
    """' (in FILE)' when the group ``key`` belongs to was chosen on the command line from a user's config file."""
    group = re.split(r"[.\[]", key, maxsplit=1)[0]
    chosen = [o.partition("=")[2] for o in overrides if _key(o) == group]
    if not chosen or not SEARCH_PATH:
        return ""
    where = next((folder / group / f"{chosen[-1]}.yaml" for folder in config_folders()
                  if (folder / group / f"{chosen[-1]}.yaml").is_file()), None)
    return "" if where is None or where.is_relative_to(CONF_DIR) else f" (in {where})"


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose a config from conf/ and the user's search path exactly as the command line would, outside @hydra.main.

    A ``hydra.searchpath=[...]`` among ``overrides`` adds its entries after :data:`SEARCH_PATH`'s.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    rest = [o for o in overrides if _key(o) != "hydra.searchpath"]
    listed = [e for o in overrides if _key(o) == "hydra.searchpath" for e in searchpath_entries(o)]
    entries = list(dict.fromkeys([*SEARCH_PATH, *listed]))
    if entries:
        rest.append(searchpath_override(entries))
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=rest)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=rest)


def swept_values(overrides: list[str], key: str) -> list[str] | None:
    """The values a sweep override of ``key`` (``seed=0,1,2``, ``seed=range(3)``) lists; None when it is not swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for a in overrides:
        if a.startswith("-") or _key(a) != key:
            continue
        try:
            o = OverridesParser.create().parse_override(a)
        except Exception:  # noqa: BLE001 - the guard reports a malformed override
            continue
        if o.is_sweep_override():
            return list(o.sweep_string_iterator())
    return None


def _key(override: str) -> str:
    """The key an override sets (``++a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _combinations(overrides: list[str]) -> Iterable[list[str]]:
    """The first value of every sweep, then each other value of each sweep on its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values] or [f"{key}="])
    base = [c[0] for c in choices]
    yield base
    for i, c in enumerate(choices):
        for alt in c[1:]:
            yield base[:i] + [alt] + base[i + 1:]
def explain(e: BaseException) -> str:
    """One line from Hydra/OmegaConf's error: which key, what is wrong, how to fix it."""
    mark = getattr(e, "problem_mark", None)  # a YAML syntax error, e.g. in a user's own config file
    if mark is not None and getattr(e, "problem", None):
        return f"{mark.name}, line {mark.line + 1}: not valid YAML ({e.problem})"
    text = str(e)
    if m := re.search(r"Could not find '([\w/]+)/([^']+)'", text):
        group, option = m.groups()
        return f"{group}: unknown option {option!r}; choose one of {', '.join(group_options(group))}"
    if m := re.search(r"Could not (?:override|append to) '([^']+)'", text):
        key = m.group(1)
        return f"{key}: unknown config key{_suggest(key)} (see `python -m sim --cfg job` for all keys)"
    if m := re.search(r"Key '([^']+)' is not in struct", text):
        return f"{m.group(1)}: unknown config key (see `python -m sim --cfg job` for all keys)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _suggest(key: str) -> str:
    """'; did you mean X?' for a misspelt dotted key, from the composed default config."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(compose("config", []), resolve=False)
    except Exception:  # noqa: BLE001 - suggestions are best-effort
        return ""
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in filter(None, parent.split(".")):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    known = list(node) if isinstance(node, dict) else []
    close = difflib.get_close_matches(leaf, known, n=1)
    if close and close[0] == leaf:  # the default option has it, the one chosen (scheme=scaffold, say) does not
        return f"; the {parent} chosen here has no such key, though the default {parent} has"
    return f"; did you mean {'.'.join(filter(None, [parent, close[0]]))}?" if close else ""
