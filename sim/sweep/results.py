"""The results of a sweep: its trials' run directories read back into one table per trial and a summary.

Pure pandas over the trials' tables (the results schema of sim/core/results.py) and what
Tune reported; no Ray. ``trials.parquet`` has one row per trial: its swept values and
seed, status (complete, stopped early by the scheduler, error), final metrics, and the
gain over the isolated trial with the same other values.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from analysis.metrics import MIN_SEEDS  # fewest seeds an interval is shown for
from sim.core.results import frame
from sim.sweep.design import DESIGN_FILE, DESIGN_ROW
from sim.sweep.space import METRICS, VARIANT, SweepSpec, trial_values

TIMES = "trial.json"  # when a trial's run started and finished, next to its tables (kept across a resume)
SCENARIO_GROUPS = ("scenario", "data", "model")  # swept keys under these name the scenario in the combined tables


def replay(metrics: pd.DataFrame) -> list[tuple[int, dict[str, float]]]:
    """The per-round reports of a finished run, recomputed from its metrics table (as the engine's on_round)."""
    acc = metrics[(metrics["metric"] == "accuracy") & (metrics["round"] > 0)]
    loss = metrics[(metrics["metric"] == "loss") & (metrics["round"] > 0) & (metrics["institution"] == "global")]
    out = []
    for r, rows in acc.groupby("round"):
        inst = rows[rows["institution"] != "global"]["value"]
        out.append((int(r), {"global_accuracy": float(rows[rows["institution"] == "global"]["value"].iloc[0]),
                             "global_loss": float(loss[loss["round"] == r]["value"].iloc[0]),
                             "mean_accuracy": float(inst.mean()), "worst_accuracy": float(inst.min())}))
    return out


def read_text(path: Path) -> str:
    """A small text file's contents, or '' when it is missing."""
    try:
        return path.read_text()
    except OSError:
        return ""


def finished(run_dir: Path) -> bool:
    """A run directory with its tables written and not marked unfinished."""
    from analysis.runs import COMPLETE, NO_STATUS, run_state

    return (run_dir / "metrics.parquet").is_file() and run_state(run_dir) in (COMPLETE, NO_STATUS)


def collect(spec: SweepSpec, grid, sweep_dir: Path, scheme_of: Callable[[dict], str]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One row per trial (values, status, final metrics, gain over isolated) and the finished trials' tables."""
    rows, tables = [], {"metrics": [], "ledger": [], "institutions": []}
    for result in grid:
        trial_id = Path(result.path).name
        if result.config is None:  # the sweep was interrupted before this trial started
            rows.append({"trial_id": trial_id, "status": "pending"})
            continue
        run_dir = sweep_dir / "trials" / trial_id
        reported = result.metrics or {}
        done = finished(run_dir)
        short = reported.get("round", 0) < reported.get("rounds", math.inf)
        status = "error" if result.error else "complete" if done else "stopped" if short and spec.scheduler else "incomplete"
        values = trial_values(spec, result.config)
        own = {kind: pd.read_parquet(run_dir / f"{kind}.parquet") for kind in tables} if done else {}
        # A finished run's tables name its scheme; composing each trial's config again costs ~0.2 s a trial.
        named = VARIANT not in values and done and len(own["metrics"])
        row = {"trial_id": trial_id, "status": status,
               "scheme": str(own["metrics"]["scheme"].iloc[0]) if named else scheme_of(values), **values,
               "rounds": reported.get("round", 0), **{m: reported.get(m, math.nan) for m in METRICS},
               "started": reported.get("started", math.nan), "finished": reported.get("finished", math.nan), "run_id": None,
               "run_dir": str(run_dir.relative_to(sweep_dir)) if done else None,
               "error": str(result.error).strip().splitlines()[0] if result.error else None}
        if done:
            for kind in tables:
                tables[kind].append(_relabel(spec, own[kind], row))
            row["run_id"] = tables["metrics"][-1]["run_id"].iloc[0]
            row.update(_selected(tables["metrics"][-1]))
        rows.append(row)
    trials = pd.DataFrame(rows)
    trials = trials.merge(gains(spec, trials, tables["metrics"]), on="trial_id", how="left")
    first = ["trial_id", "status", "scheme", *spec.keys, "seed", "rounds", *METRICS, "mean_gain", "worse_off"]
    trials = trials.reindex(columns=list(dict.fromkeys(first + list(trials.columns))))
    trials = trials.sort_values("trial_id", kind="stable").reset_index(drop=True)
    combined = {k: pd.concat(v, ignore_index=True) if v else frame(k, []) for k, v in tables.items()}
    return trials, combined


def _selected(metrics: pd.DataFrame) -> dict[str, float]:
    """A finished trial's scores at the rounds its model-selection rule picked (results.select), as every table reports them.

    Tune saw every round's scores while the trial ran (schedulers stop trials on them); the
    trials table reports what the compare and the report would: the selected round's.
    """
    from analysis.metrics import GLOBAL, final_table

    final = final_table(metrics)
    glob, inst = final[final["institution"] == GLOBAL], final[final["institution"] != GLOBAL]
    return {"global_accuracy": float(glob["accuracy"].mean()), "global_loss": float(glob["loss"].mean()),
            "mean_accuracy": float(inst["accuracy"].mean()), "worst_accuracy": float(inst["accuracy"].min())}


def _relabel(spec: SweepSpec, df: pd.DataFrame, row: Mapping) -> pd.DataFrame:
    """Name the scenario after the swept scenario/data/model values, so analysis matches gains within it;
    a variant's runs carry its label as their scheme (as a compare's variants do)."""
    if VARIANT in row:
        df = df.assign(scheme=row["scheme"])
    keys = [k for k in spec.keys if k.split(".")[0] in SCENARIO_GROUPS]
    if DESIGN_ROW in row:  # a design point is a scenario of its own, whichever groups its levers are in
        df = df.assign(scenario=df["scenario"] + f" (design point {row[DESIGN_ROW]})")
    elif keys:
        df = df.assign(scenario=df["scenario"] + " (" + ", ".join(f"{k}={row[k]}" for k in keys) + ")")
    return df


def gains(spec: SweepSpec, trials: pd.DataFrame, metrics: list[pd.DataFrame]) -> pd.DataFrame:
    """Per trial: mean gain over isolated in points and institutions worse off, against the isolated trial
    with the same values of everything but the scheme (and its hyperparameters); NaN where none exists."""
    from analysis.metrics import BASELINE, gain_table

    out = pd.DataFrame({"trial_id": trials["trial_id"], "mean_gain": math.nan, "worse_off": pd.NA})
    if not metrics:
        return out.astype({"worse_off": "Int64"})
    same = [k for k in spec.keys if k not in ("scheme", VARIANT) and not k.startswith("scheme.")] + ["seed"]
    runs = trials.dropna(subset=["run_id"]).set_index("run_id")
    by_run = {df["run_id"].iloc[0]: df for df in metrics}
    for _, group in runs.groupby(same, dropna=False):
        if not (group["scheme"] == BASELINE).any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # several isolated trials of one group (repeated samples) are averaged
            g = gain_table(pd.concat([by_run[r] for r in group.index.unique()], ignore_index=True))
        per_run = g.groupby("run_id")["gain"].agg(mean_gain="mean", worse_off=lambda x: int((x < 0).sum()))
        for run_id, trial_id, scheme in zip(group.index, group["trial_id"], group["scheme"]):
            mask = out["trial_id"] == trial_id
            if scheme == BASELINE:
                out.loc[mask, ["mean_gain", "worse_off"]] = [0.0, 0]
            elif run_id in per_run.index:
                out.loc[mask, ["mean_gain", "worse_off"]] = per_run.loc[run_id].tolist()
    return out.astype({"worse_off": "Int64"})


def summarize(spec: SweepSpec, trials: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (every swept value but the seed): seeds, and mean with 95% interval of the metric and the gain.

    The interval is NaN for a configuration with fewer than ``MIN_SEEDS`` seeds.
    """
    from analysis.metrics import mean_interval, scheme_order

    config = ["scheme"] + [k for k in spec.keys if k != "scheme"]  # a variant's value keeps its own grid's values apart
    done = trials[trials["status"] == "complete"]  # a trial stopped early ends on an earlier round: not comparable
    rows = []
    for values, g in done.groupby(config, dropna=False, sort=False):
        row = dict(zip(config, values if isinstance(values, tuple) else (values,)))
        row["seeds"] = int(g["seed"].nunique())
        for column in (spec.metric, "mean_gain"):
            row[column], row[f"{column}_low"], row[f"{column}_high"] = mean_interval(g[column].astype(float))
            if row["seeds"] < MIN_SEEDS:  # two seeds give an interval too wide to mean anything: none is shown
                row[f"{column}_low"] = row[f"{column}_high"] = math.nan
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*config, "seeds", spec.metric, f"{spec.metric}_low", f"{spec.metric}_high",
                                        "mean_gain", "mean_gain_low", "mean_gain_high"])
    if table.empty:
        return table
    rank = {s: i for i, s in enumerate(scheme_order(table["scheme"].dropna()))}
    keys = ["_r", *config[1:]]
    table = table.assign(_r=table["scheme"].map(rank))
    if VARIANT in table:  # variants in the file's order (epsilon 1, 4, 16), not as their names sort
        order = {v: i for i, v in enumerate(next(d.values for d in spec.dimensions if d.key == VARIANT))}
        table, keys = table.assign(_v=table[VARIANT].map(order)), [k if k != VARIANT else "_v" for k in keys]
    return table.sort_values(keys).drop(columns=["_r", "_v"], errors="ignore").reset_index(drop=True)


def best(spec: SweepSpec, summary: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """The ``n`` best configurations by the sweep's metric (mean over seeds), those that ran on the most seeds first.

    Under ASHA a configuration stopped on a hard seed keeps only its easier seeds: ranked
    on its mean alone, it would beat the configurations that survived every seed.
    """
    return summary.sort_values(["seeds", spec.metric], ascending=[False, spec.mode == "min"], na_position="last").head(n)


def progress_line(spec: SweepSpec, values: Mapping, result: Mapping, done: int, total: int,
                  error: object = None, sweep_seconds: float | None = None) -> str:
    """The console line of one finished (or failed) trial: its swept values and seed, its metric, how long it took."""
    what = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "?"
    started, ended = result.get("started"), result.get("finished")
    took = ended - started if isinstance(started, float) and isinstance(ended, float) else result.get("time_total_s")
    elapsed = [_duration(took)] if isinstance(took, (int, float)) and not error else []
    elapsed += [] if sweep_seconds is None else [f"sweep {_duration(sweep_seconds)}"]
    when = f"  ({'; '.join(elapsed)})" if elapsed else ""
    if error is not None:
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        return f"trial {done}/{total} failed: {what}: {lines[-1] if lines else type(error).__name__}{when}"
    metric = result.get(spec.metric)
    shown = f"{spec.metric} {metric:.3f}" if isinstance(metric, (int, float)) else f"{spec.metric} -"
    r, rounds = result.get("round"), result.get("rounds")
    if isinstance(r, int) and isinstance(rounds, int) and r < rounds:
        shown += f", stopped at round {r}/{rounds}"
    return f"trial {done}/{total} finished: {what}  {shown}{when}"


def _duration(seconds: float) -> str:
    """Seconds as '4.2 s', '3 min 05 s' or '1 h 02 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def render(spec: SweepSpec, trials: pd.DataFrame, summary: pd.DataFrame, sweep_dir: Path) -> str:
    """What the command prints: counts, the per-configuration summary and the best configurations."""
    counts = trials["status"].value_counts()
    lines = [f"sweep {spec.name}: {len(trials)} trials, " + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]
    if spec.search == "sobol":  # a row per design point says little: the indices do
        crossed = " x ".join([d.key for d in spec.dimensions if d.kind == "grid"] + [f"{len(spec.seeds)} seed(s)"])
        return "\n".join(lines + [
            f"a Sobol' design of {spec.design_points} points over {len(spec.drawn)} levers ({sweep_dir / DESIGN_FILE}), "
            f"each run for {crossed}", f"trials: {sweep_dir / 'trials.csv'}",
            f"what drives each outcome: python -m analysis sensitivity {sweep_dir}",
            f"the report, with the indices and collaboration maps: python -m analysis report {sweep_dir}"])
    config = [c for c in summary.columns if c in ("scheme", *spec.keys)]

    def interval(row, column, fmt):
        mean, low, high = row[column], row[f"{column}_low"], row[f"{column}_high"]
        return "-" if pd.isna(mean) else fmt.format(mean) + ("" if pd.isna(low) else " [" + fmt.format(low) + ", " + fmt.format(high) + "]")

    shown = summary[config + ["seeds"]].copy()
    shown[spec.metric] = [interval(r, spec.metric, "{:.3f}") for _, r in summary.iterrows()]
    shown["mean_gain"] = [interval(r, "mean_gain", "{:+.2f}") for _, r in summary.iterrows()]
    lines += ["per configuration, trials that ran every round: mean over seeds [95% interval]; "
              "gain in accuracy points over isolated", shown.to_string(index=False)]
    if (summary["seeds"] < MIN_SEEDS).any():
        lines.append(f"no interval where a configuration has fewer than {MIN_SEEDS} seeds: too few seeds "
                     "(list more under sweep.seeds)")
    lines += ["", f"best by {spec.metric} ({spec.mode}):"]
    for i, (_, r) in enumerate(best(spec, summary).iterrows(), 1):
        lines.append(f"  {i}. " + " ".join(f"{c}={r[c]:.4g}" if isinstance(r[c], float) else f"{c}={r[c]}" for c in config)
                     + f"  {spec.metric} "
                     + interval(r, spec.metric, "{:.3f}") + f"  ({int(r['seeds'])} seed{'s' * (int(r['seeds']) != 1)})")
    lines += ["", f"trials: {sweep_dir / 'trials.csv'}", f"tables: {sweep_dir} (python -m analysis report {sweep_dir})"]
    return "\n".join(lines)
