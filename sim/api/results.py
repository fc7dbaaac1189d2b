"""Results objects: a run, a comparison or a sweep read from its directory, with its tables, plots and report.

Every object reads its run directory the way ``python -m analysis report`` does
(`analysis.runs.load_results`, `analysis.report.analyse`), so its tables are
the report's tables, column for column (the results schema: ``sim/core/results.py``), and
its plots are the report's figures.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.core import rundir
from sim.core.types import ConfigError


class Results:
    """The tables, plots and report of one results directory (the base of Run, Comparison and SweepResult).

    Attributes:
        path: The directory the results are in (a run, compare or sweep directory).
    """

    kind = "results"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- the tables of the directory -----------------------------------------------------------------

    @functools.cached_property
    def _runs(self):
        """The runs' tables and configs (`analysis.runs.Results`), read once."""
        from analysis.runs import load_results

        return load_results([self.path])

    @functools.cached_property
    def _tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the report (`analysis.report.analyse`), computed once; its warnings are Python warnings."""
        from analysis.report import analyse

        return analyse(self._runs)

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per run x round x institution x metric (institution ``global``: the merged model)."""
        return self._runs.metrics

    @property
    def ledger(self) -> pd.DataFrame:
        """One row per run x round x institution: bytes up and down, compute and simulated seconds, samples, epsilon."""
        return self._runs.ledger

    @property
    def institutions(self) -> pd.DataFrame:
        """One row per run x institution: discipline, share, samples, skew, resources, behaviour."""
        return self._runs.institutions

    @property
    def summary(self) -> pd.DataFrame:
        """One row per scheme (mean over seeds): accuracies, mean gain with its 95% interval, worse off, megabytes."""
        return self._tables["summary"]

    @property
    def gains(self) -> pd.DataFrame:
        """Each institution's gain over training alone per scheme, in accuracy points, with its 95% interval.

        Columns: scenario, scheme, institution, discipline, seeds, gain, gain_low, gain_high,
        gain_note (why an interval is blank), loss_change, worse_off. Empty without an
        ``isolated`` run to measure against.
        """
        from analysis.report import ordered_gains

        return ordered_gains(self._tables["gains"], self._tables["institutions"])

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the report by name (summary, gains, gains_per_run, fairness, costs, accuracy_per_round, ...)."""
        return dict(self._tables)

    @property
    def caveats(self) -> list[str]:
        """What the numbers mean that they do not show (the notes a command prints under its table)."""
        from sim.core.caveats import caveats

        return caveats(self._runs.configs.values(), self.institutions, self.metrics)

    @functools.cached_property
    def config(self) -> DictConfig:
        """The resolved config the directory's command ran with (its ``config.yaml``); pass it to `sim.run`."""
        path = self.path / "config.yaml"
        return OmegaConf.load(path) if path.is_file() else OmegaConf.create({})

    # ---- what to show ---------------------------------------------------------------------------------

    def report(self, path: str | Path | None = None) -> Path:
        """Write the HTML report (``report.html`` and ``tables/``) into ``path`` (default: the results directory).

        Returns:
            The path of ``report.html``: what ``python -m analysis report DIR --out PATH`` writes.
        """
        from analysis.report import build_report

        return build_report([self.path], Path(path) if path is not None else self.path)

    def plot_gains(self, scenario: str | None = None):
        """Bars of each institution's mean gain per scheme with 95% interval whiskers (a matplotlib Figure)."""
        from analysis import plots

        gains = self._scenario(self.gains, scenario)
        if gains.empty or gains["gain"].isna().all():
            raise ConfigError("plot_gains", f"{self.path} has no gain to plot: gains are measured against the "
                              "isolated baseline; compare with it, e.g. api.compare(['fedavg'])")
        return plots.gain_plot(gains)

    def plot_rounds(self, scenario: str | None = None):
        """Accuracy per round and scheme, on the global test set and on the institutions' own (a matplotlib Figure)."""
        from analysis import plots

        curve = self._scenario(self._tables["accuracy_per_round"], scenario)
        own = self._scenario(self._tables["own_accuracy_per_round"], scenario)
        return plots.accuracy_plot(curve, own)

    def plot_costs(self, scenario: str | None = None):
        """Mean accuracy against megabytes exchanged per scheme, the Pareto front joined (a matplotlib Figure)."""
        from analysis import plots

        return plots.pareto_plot(self._scenario(self._tables["costs"], scenario))

    def _scenario(self, table: pd.DataFrame, scenario: str | None) -> pd.DataFrame:
        """The rows of one scenario: ``scenario``, or the only one (ConfigError naming them when there are several)."""
        if "scenario" not in table or table.empty:
            return table
        names = list(dict.fromkeys(table["scenario"].dropna()))
        if scenario is None and len(names) > 1:
            raise ConfigError("scenario", f"{self.path} holds {len(names)} scenarios ({', '.join(names)}); "
                              "pass scenario=NAME")
        if scenario is not None and scenario not in names:
            raise ConfigError("scenario", f"unknown scenario {scenario!r}; choose one of {', '.join(names)}")
        return table[table["scenario"] == (scenario or names[0])]

    def _repr_html_(self) -> str:
        """A notebook shows what it is, where, and its summary table."""
        import html

        return (f"<p><b>{self.kind}</b> in <code>{html.escape(str(self.path))}</code></p>"
                + self.summary.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep=""))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class Run(Results):
    """One simulation's results (``python -m sim``): its tables, the config it ran with, plots and report."""

    kind = "run"

    @property
    def run_id(self) -> str:
        """The run's stable id (scheme, scenario, seed and a hash of its config)."""
        return str(self.metrics["run_id"].iloc[0])

    @property
    def final(self) -> pd.DataFrame:
        """Each institution's and the global model's values in the round reported (results.select), one column per metric."""
        from analysis.metrics import final_table

        return final_table(self.metrics)


class Comparison(Results):
    """Several schemes on one scenario over seeds (``python -m sim.compare``): gains against training alone."""

    kind = "comparison"

    def run(self, label: str, seed: int | None = None) -> Run:
        """One run of the comparison: the scheme (or variant) ``label`` on ``seed`` (the only or first seed by default)."""
        runs = sorted((self.path / "runs").glob("*"))
        stem = label.replace("/", "-")
        found = [r for r in runs if r.name == stem or (r.name.startswith(f"{stem}-s")
                                                      and (seed is None or r.name == f"{stem}-s{seed}"))]
        if not found:
            raise ConfigError("label", f"no run {label!r}{'' if seed is None else f' with seed {seed}'} in "
                              f"{self.path / 'runs'}; it holds {', '.join(r.name for r in runs)}")
        return Run(found[0])


class SweepResult(Results):
    """A Ray Tune sweep (``python -m sim.sweep``): one row per trial, a summary per configuration, every trial's tables."""

    kind = "sweep"

    @functools.cached_property
    def trials(self) -> pd.DataFrame:
        """One row per trial: its swept values and seed, status, final metrics and gain over isolated."""
        return pd.read_parquet(self.path / "trials.parquet")

    @property
    def summary(self) -> pd.DataFrame:
        """One row per configuration (mean over seeds, 95% interval), best first: the sweep's ``summary.csv``."""
        return pd.read_csv(self.path / "summary.csv")

    @property
    def schemes(self) -> pd.DataFrame:
        """The report's summary by scheme (and swept values), as `Results.summary` is for a comparison."""
        return self._tables["summary"]


def load(path: str | Path) -> Run | Comparison | SweepResult:
    """Read a finished run, compare or sweep directory back into its results object.

    Args:
        path: The directory a command or `sim.run`, `sim.compare` or `sim.sweep` wrote.

    Returns:
        A `SweepResult` for a sweep directory, a `Comparison` for a compare's (or a
        folder of run directories, like Hydra's multirun), a `Run` for a run's.

    Raises:
        ConfigError: the path is no directory, holds no results, or its run did not finish (the
            message names the path and how to continue it, as ``python -m analysis report`` says it).
    """
    from analysis.runs import COMPLETE, NO_STATUS, RunDirError, find_run_dirs, run_state

    p = Path(path)
    if p.is_dir() and (p / rundir.SWEEP_MARKER).is_file() and not (p / "trials.parquet").is_file():
        raise ConfigError(str(p), "its sweep has not finished; continue it with api.sweep(..., resume=True, "
                          f"out={str(p)!r}) (python -m sim.sweep ... resume=true hydra.run.dir={p})")
    if p.is_dir() and (p / rundir.COMPARE_MARKER).is_file() and not (p / "metrics.parquet").is_file():
        raise ConfigError(str(p), "its compare has not finished; continue it with api.compare(..., resume=True, "
                          f"out={str(p)!r}) (the same command plus resume=true hydra.run.dir={p})")
    try:
        find_run_dirs([p])
    except RunDirError as e:
        where, _, problem = str(e).partition(": ")
        raise ConfigError(where, problem) from None
    if (p / "trials.parquet").is_file():
        return SweepResult(p)
    if (p / rundir.COMPARE_MARKER).is_file() or not (p / "metrics.parquet").is_file():
        return Comparison(p)
    state = run_state(p)
    if state not in (COMPLETE, NO_STATUS):
        raise ConfigError(str(p), f"its run is {state}, not complete; continue it with "
                          f"api.run(api.compose(resume={str(p)!r})) (python -m sim resume={p})")
    return Run(p)
