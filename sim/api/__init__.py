"""The Python API: the commands' runs, comparisons and sweeps from a notebook or a script.

Each function does what its command does, through the command's own code: the same
composition and defaults (Hydra, ``conf/``), the same pre-run checks, the same run
directories and tables. Bad input raises `ConfigError` whose message is the very
line the command prints after ``error:``, naming the key and the fix.

Example:
    >>> from sim import api
    >>> result = api.compare(["fedavg", "fedprox"], seeds=3, rounds=10)
    >>> result.gains          # each institution's gain over training alone, with 95% intervals
    >>> result.plot_gains()   # a matplotlib Figure

Configs are written as keywords (``rounds=5``, ``scheme="fedprox"``), nested keys with a double
underscore or a dict (``data__alpha=0.1`` or ``data={"alpha": 0.1}``), or as command-line
override strings (``"scheme.mu=0.1"``); ``api.compose(...).command`` shows the command line.
"""

from __future__ import annotations

import datetime
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from omegaconf import DictConfig

from sim.api.config import Config, compose_as, overrides_of, search_path, searching, value
from sim.api.console import LOG_FILE, Bar, level_of, logging_to
from sim.api.results import Comparison, Results, Run, SweepResult, load
from sim.core.types import ConfigError, RunFailed

__all__ = ["compose", "run", "compare", "sweep", "load", "Config", "Results", "Run", "Comparison", "SweepResult",
           "ConfigError", "RunFailed"]
CONF = Path(__file__).resolve().parent.parent.parent / "conf"
ConfigDirs = str | Path | Iterable[str | Path] | None


def compose(*overrides: str, experiment: str | None = None, config_dir: ConfigDirs = None, **keys: Any) -> Config:
    """Compose and check a run's config exactly as ``python -m sim`` does with the same overrides.

    Args:
        *overrides: Command-line overrides, e.g. ``"scheme=fedprox"``, ``"scheme.mu=0.1"``,
            ``"+variants.x=[...]"``: anything the command line takes.
        experiment: A file of ``conf/experiment/`` (or of ``config_dir``), as ``+experiment=NAME``.
        config_dir: Your own config folder(s), laid out like ``conf/``, as ``--config-dir DIR``.
        **keys: Config keys: ``rounds=5``, ``scheme="fedprox"`` (a group's option),
            ``data__alpha=0.1`` or ``data={"alpha": 0.1}`` (nested keys), ``engine__backend="inprocess"``.

    Returns:
        The composed, checked `Config`; ``config.command`` is the equivalent command line.

    Raises:
        ConfigError: an unknown key or option, a value of the wrong type or range, a scenario
            that cannot run: the line ``python -m sim`` prints, naming the key and the fix.
    """
    from sim.checks import load_spec
    from sim.core.checkpoint import resume_overrides

    args = overrides_of(overrides, keys, experiment)
    resume_overrides(args)  # resume=DIR takes its saved config: other overrides are refused, as on the command line
    return compose_as("config", args, search_path(config_dir), load_spec)


def run(config: Config | DictConfig | Mapping[str, Any] | None = None, *, out: str | Path | None = None,
        progress: bool = True, log_level: str | int = "WARNING") -> Run:
    """Run one simulation, as ``python -m sim`` with the same overrides: the same run directory and tables.

    Args:
        config: A `Config` from `compose`; a dict, read as `compose`'s keywords
            (``{"rounds": 5, "data": {"alpha": 0.1}}``: the command line's defaults for the rest);
            an OmegaConf config used as it is (``api.load(d).config``, a saved run's); None: the defaults.
        out: The run directory (``hydra.run.dir``); by default ``outputs/DATE/TIME`` as the command's.
            A config with ``resume=DIR`` continues DIR.
        progress: Show a progress bar over the rounds (tqdm; a widget in Jupyter).
        log_level: Log lines shown (``"INFO"``: the command's line per round); the run directory's
            ``collabsim.log`` gets INFO whatever this is.

    Returns:
        The `Run` read from its directory.

    Raises:
        ConfigError: bad input, before anything starts (the command's one line).
        RunFailed: the run stopped; its directory keeps the last checkpoint (the message says how to continue).
    """
    from sim import engine
    from sim.checks import load_spec
    from sim.engine import Diverged

    config = _as_config(config)
    level = level_of(log_level)
    with searching(config.config_dir):
        spec = load_spec(config.tree)
        where = Path(spec.resume) if spec.resume else _out(out, "config")
        with logging_to(level, where / LOG_FILE), Bar(spec.rounds, spec.scheme_name, progress) as bar:
            try:
                engine.run(config.tree, where, on_round=bar.round)
            except Diverged:  # resuming would diverge again: its message says what to change
                raise
            except RunFailed as e:
                raise RunFailed(f"{e}; continue with: api.run(api.compose(resume={str(where)!r})) "
                                f"(python -m sim resume={where})") from e
            return _noted(Run(where))


def compare(schemes: str | Iterable[str] | None = None, *overrides: str, seeds: int | None = None,
            experiment: str | None = None, config_dir: ConfigDirs = None,
            variants: Mapping[str, Iterable[str]] | None = None, parts: Mapping[str, Mapping[str, Any]] | None = None,
            out: str | Path | None = None, resume: bool = False, progress: bool = True,
            log_level: str | int = "WARNING", **keys: Any) -> Comparison:
    """Compare schemes on one scenario over seeds, as ``python -m sim.compare``: runs, tables, summary and report.

    Args:
        schemes: Scheme names; the ``isolated`` baseline is added when missing (default: conf/compare.yaml's
            isolated, pooled, fedavg, fedprox, scaffold).
        *overrides: Command-line overrides for every run, e.g. ``"scheme.mu=0.1"``.
        seeds: Replications: seeds ``seed`` .. ``seed + seeds - 1`` (default 3; 95% intervals need 3 or more).
        experiment: A file of ``conf/experiment/``, as ``+experiment=NAME``.
        config_dir: Your own config folder(s), as ``--config-dir DIR``.
        variants: ``{LABEL: [overrides]}``: runs beside the schemes under their own label
            (``+variants.LABEL=[...]``).
        parts: ``{LABEL: {"schemes": [...], "overrides": [...]}}``: several comparisons in one.
        out: The compare's directory (``hydra.run.dir``); by default ``outputs/DATE/TIME``.
        resume: Continue the compare in ``out`` without redoing finished runs (``resume=true``).
        progress: Show a progress bar over every run's rounds.
        log_level: Log lines shown (``"INFO"``: the command's lines).
        **keys: Config keys for every run, as for `compose` (``rounds=10``, ``report=False``, ...), and the
            compare's own ``tune=N``: each scheme first gets the same N Ray Tune trials of its own settings, chosen on
            validation data (docs/how-to/tune-schemes.md).

    Returns:
        The `Comparison`: ``summary``, ``gains`` (with intervals), plots and ``report()``.

    Raises:
        ConfigError: bad input, before any run starts (the command's one line).
    """
    from sim import compare as command
    from sim.engine import Diverged

    args = overrides_of(overrides, {}, experiment)
    if schemes is not None:
        args.append(f"schemes={value([schemes] if isinstance(schemes, str) else list(schemes), 'schemes')}")
    if seeds is not None:
        args.append(f"seeds={value(seeds, 'seeds')}")
    args += [f"+variants.{label}={value(list(v), f'variants.{label}')}" for label, v in (variants or {}).items()]
    args += [f"+parts.{label}={value(dict(p), f'parts.{label}')}" for label, p in (parts or {}).items()]
    if resume:
        if out is None:
            raise ConfigError("resume", "give out=DIR, the directory of the compare to continue")
        args.append("resume=true")
    args += overrides_of((), keys)
    specs: dict = {}
    with logging_to(logging.ERROR):  # what the check warns of, the compare warns of again as it runs
        config = compose_as("compare", args, search_path(config_dir), lambda c, o: specs.update(command.check(c, o)),
                            with_overrides=True)
    level, seed_count = level_of(log_level), len(command.seed_list(config.tree))
    where = _out(out, "compare")
    total = seed_count * sum(s.rounds for s in specs.values())
    with searching(config.config_dir), logging_to(level, where / LOG_FILE), \
            Bar(total, f"{len(specs)} schemes x {seed_count} seeds", progress) as bar:
        try:
            command.compare(config.tree, list(config.overrides), where, on_round=bar.round)
        except Diverged:  # resuming would diverge again: its message says what to change
            raise
        except RunFailed as e:  # the runs that finished are kept: the same call with resume=True does only the rest
            raise RunFailed(f"{e}; continue with the same call plus resume=True, out={str(where)!r}") from e
        command.write_report(config.tree, where)
        return _noted(Comparison(where))


def sweep(name: str | Mapping[str, Any] | None = None, *overrides: str, config_dir: ConfigDirs = None,
          out: str | Path | None = None, resume: bool = False, log_level: str | int = "WARNING",
          **keys: Any) -> SweepResult:
    """Run a Ray Tune sweep, as ``python -m sim.sweep sweep=NAME``: one run directory per trial, tables, summary.

    Args:
        name: A sweep file of ``conf/sweep/`` (or of ``config_dir``), e.g. ``"fedprox_mu"``; or the
            sweep itself as a dict laid out like such a file (``{"space": {"scheme.mu": {"grid": [0.01, 0.1]}},
            "seeds": [0, 1, 2]}``); None: conf/sweep_main.yaml's default.
        *overrides: Command-line overrides, for the sweep (``"sweep.scheduler=asha"``) or every trial (``"rounds=5"``).
        config_dir: Your own config folder(s), as ``--config-dir DIR``.
        out: The sweep's directory (``hydra.run.dir``); by default ``outputs/sweeps/DATE/TIME``.
        resume: Continue the interrupted sweep in ``out`` (``resume=true``).
        log_level: Log lines shown; Tune's trials print one line each as they finish.
        **keys: Config keys, as for `compose`: ``rounds=5``, ``smoke=True``, ``sweep__max_concurrent=2``.

    Returns:
        The `SweepResult`: ``trials``, ``summary`` (per configuration), every trial's tables.

    Raises:
        ConfigError: bad input, before Ray starts (the command's one line).
        RunFailed: some trial failed or the sweep was interrupted; what finished is in ``out`` (``sim.load``).
    """
    from sim import sweep as command
    from sim.core import rundir

    dirs, made = list(search_path(config_dir)), None
    args = overrides_of(overrides, {})
    if isinstance(name, Mapping):  # a sweep file of its own, in a config folder of its own
        made = Path(tempfile.mkdtemp(prefix="collabsim-sweep-"))
        (made / "sweep").mkdir()
        (made / "sweep" / "python.yaml").write_text(yaml.safe_dump({"name": "python", **dict(name)}, sort_keys=False))
        dirs, name = [*dirs, f"file://{made}"], "python"
    if name is not None:
        args.insert(0, f"sweep={value(name, 'sweep')}")
    if resume:
        if out is None:
            raise ConfigError("resume", "give out=DIR, the directory of the sweep to continue")
        args.append("resume=true")
    args += overrides_of((), keys)
    try:
        with logging_to(logging.ERROR):  # what the check warns of, the sweep warns of again as it runs
            config = compose_as("sweep_main", args, tuple(dirs), command.check, with_overrides=True)
        where = _out(out, "sweep_main")
        with searching(config.config_dir), logging_to(level_of(log_level), where / LOG_FILE):
            try:
                trials, _ = command.sweep(config.tree, list(config.overrides), where)
            finally:
                rundir.release(where.resolve())
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    failed = trials[trials["status"] == "error"]
    if len(failed):
        raise RunFailed(f"{len(failed)} trial(s) failed; first: {failed['error'].iloc[0]}; the others are in "
                        f"{where}: api.load({str(where)!r})")
    if trials["status"].isin(["pending", "incomplete"]).any():
        raise RunFailed(f"interrupted with unfinished trials; continue with the same call and resume=True, "
                        f"out={str(where)!r}")
    return _noted(SweepResult(where))


# ---- helpers -------------------------------------------------------------------------------------

def _as_config(config: Config | DictConfig | Mapping[str, Any] | None) -> Config:
    """A run's Config from what `run` takes."""
    if config is None:
        return compose()
    if isinstance(config, Config):
        if config.name != "config":
            raise ConfigError("config", f"this is a {config.name} config; run it with api.{config.name.split('_')[0]}(...)")
        return config
    if isinstance(config, DictConfig):
        return Config(tree=config)
    if isinstance(config, Mapping):
        return compose(**config)
    raise ConfigError("config", f"expected api.compose(...), a dict of config keys or an OmegaConf config, got "
                      f"{type(config).__name__}")


def _out(out: str | Path | None, name: str) -> Path:
    """The directory a command would write into: ``out``, or Hydra's default ``hydra.run.dir`` of conf/``name``.yaml
    at this time; a default one already used (two calls in one second) gets a suffix, as the command never meets it."""
    if out is not None:
        return Path(out)
    own = (yaml.safe_load((CONF / f"{name}.yaml").read_text()).get("hydra") or {}).get("run") or {}
    pattern = own.get("dir") or yaml.safe_load((CONF / "config.yaml").read_text())["hydra"]["run"]["dir"]
    now = datetime.datetime.now()
    base = Path(re.sub(r"\$\{now:([^}]*)\}", lambda m: now.strftime(m.group(1)), pattern))
    where, k = base, 0
    while where.exists() and any(where.iterdir()):
        k += 1
        where = base.with_name(f"{base.name}-{k}")
    return where


def _noted(results: Results) -> Results:
    """Log the notes that change what the numbers mean (the lines a command prints as ``note:``)."""
    for caveat in results.caveats:
        logging.getLogger("collabsim").warning("note: %s", caveat)
    return results
