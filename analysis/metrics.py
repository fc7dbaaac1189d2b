"""Final-round tables, collaboration gain, fairness of the gains, and the summary table.

Units, everywhere in analysis: accuracies are fractions (0 to 1); every *gain* is in
accuracy points (accuracy difference x 100, so +3.0 means three percentage points better
than training alone); loss changes are in loss units (negative = better).

The collaboration gain of an institution under a scheme is its final-round accuracy
under that scheme minus its final-round accuracy under ``isolated`` (training alone),
matched on scenario and seed: the ``scenario`` and ``seed`` columns stand for
"everything but the scheme". Several runs of one scheme, scenario and seed (a sweep over
hyperparameters) are treated as replicates; several isolated runs for one scenario and
seed are averaged into one baseline, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.certainty import MIN_SEEDS, bounded_interval, gain_range
from sim.core.results import SELECT_RULES, select_rounds  # noqa: F401 - the selection rule belongs to the results schema

BASELINE = "isolated"
"""The scheme every gain is measured against: each institution training alone."""
POOLED = "pooled"
"""The scheme that centralises all data."""
GLOBAL = "global"
"""Institution name of the merged model on the global test set (as sim.core.types.GLOBAL)."""
RUN = ["run_id", "scheme", "scenario", "seed"]
"""Columns that identify a run."""
METRICS = ("accuracy", "loss", "train_loss", "backdoor_success")


class AnalysisWarning(UserWarning):
    """A caveat about the results (an ambiguous or missing baseline) that the report shows its reader."""


def scheme_order(schemes: Iterable[str]) -> list[str]:
    """Schemes in reading order: the isolated baseline first, federated schemes by name, pooled last."""
    distinct = sorted(set(schemes))
    rank = {BASELINE: 0, POOLED: 2}
    return sorted(distinct, key=lambda s: (rank.get(s, 1), s))


def is_federated(scheme: str) -> bool:
    """True for schemes that are neither the isolated baseline nor pooled data."""
    return scheme not in (BASELINE, POOLED)


def mean_interval(values: Iterable[float], level: float = 0.95, min_n: int = MIN_SEEDS, lowest: float = -np.inf,
                  highest: float = np.inf) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of the mean; the interval is NaN with fewer than ``min_n`` values or
    when it leaves [lowest, highest] (:func:`analysis.certainty.bounded_interval` says which)."""
    return bounded_interval(values, lowest, highest, level, min_n)[:3]


def gini(values: Iterable[float]) -> float:
    """Gini of possibly negative gains: mean absolute difference / (2 x mean absolute value).

    For non-negative values this is the usual Gini (population form, pairs over n^2).
    Dividing by the mean *absolute* value, not the mean, keeps it defined when gains have
    mixed signs or average zero, and in [0, 1] since |a - b| <= |a| + |b|. It is 0 when
    all values are equal (all zero included) and NaN for no values. G(x) == G(-x), so read
    it next to the mean gain: it measures how unevenly gains are spread, not their sign.
    """
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return np.nan
    scale = 2 * np.abs(x).mean()
    if scale == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).mean() / scale)


def final_round(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rows of the round each run's selection rule picked for each institution (``selected``), else its last round.

    Runs written before model selection existed (no ``selected`` column, or no row marked)
    fall back to the highest round the run reports.
    """
    last = metrics["round"] == metrics.groupby("run_id")["round"].transform("max")
    if "selected" not in metrics:
        return metrics[last]
    chosen = metrics["selected"].fillna(False).astype(bool)
    marked = chosen.groupby(metrics["run_id"]).transform("any")
    return metrics[chosen | (~marked & last)]


def selection_stability(metrics: pd.DataFrame, window: int = 5) -> pd.DataFrame:
    """How much each institution's reported accuracy would move had each run stopped in one of its last ``window`` rounds.

    For every run x institution and each of the run's last ``window`` scored rounds t, both
    rules are applied to the rounds up to t and the test accuracy they report is taken;
    ``best_val_range`` and ``last_range`` are max - min of those ``window`` values, in accuracy
    points. A stable protocol gives the same answer whichever of those rounds the run ended in.
    """
    rows = []
    for run_id, m in metrics.groupby("run_id", sort=False):
        rounds = sorted(m.loc[m["metric"] == "accuracy", "round"].unique())[-window:]
        seen = {rule: [] for rule in SELECT_RULES}
        for t in rounds:
            upto = m[m["round"] <= t]
            for rule in SELECT_RULES:
                picked = upto[select_rounds(upto, rule) & (upto["metric"] == "accuracy")]
                seen[rule].append(picked.set_index("institution")["value"])
        first = m.iloc[0]
        for rule, per_round in seen.items():
            table = pd.concat(per_round, axis=1)
            seen[rule] = (table.max(axis=1) - table.min(axis=1)) * 100
        for institution in seen["best_val"].index:
            rows.append({"run_id": run_id, "scheme": first["scheme"], "scenario": first["scenario"],
                         "seed": first["seed"], "institution": institution, "rounds": len(rounds),
                         "best_val_range": seen["best_val"][institution], "last_range": seen["last"][institution]})
    return order_rows(pd.DataFrame(rows, columns=["run_id", "scheme", "scenario", "seed", "institution", "rounds",
                                                  "best_val_range", "last_range"]))


def final_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Final-round values: one row per run x institution (and global), one column per metric."""
    df = final_round(metrics).assign(discipline=lambda d: d["discipline"].fillna("unknown"))
    wide = df.pivot_table(index=[*RUN, "institution", "discipline"], columns="metric", values="value", aggfunc="mean")
    wide = wide.reset_index()
    wide.columns.name = None
    for metric in METRICS:
        if metric not in wide:
            wide[metric] = np.nan
    return wide[[*RUN, "institution", "discipline", *METRICS]]


def institution_finals(metrics: pd.DataFrame) -> pd.DataFrame:
    """Final-round values of the institutions only (no global row)."""
    final = final_table(metrics)
    return final[final["institution"] != GLOBAL].reset_index(drop=True)


def gain_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Collaboration gain per run x institution: final accuracy (points) and loss minus the isolated baseline's."""
    final = institution_finals(metrics)
    match = ["scenario", "seed", "institution"]
    base = final[final["scheme"] == BASELINE]
    runs_per_baseline = base.groupby(match)["run_id"].nunique()
    if (runs_per_baseline > 1).any():
        scenario, seed, _ = runs_per_baseline[runs_per_baseline > 1].index[0]
        warnings.warn(f"several isolated runs for scenario {scenario!r} seed {seed}: their mean is the baseline",
                      AnalysisWarning, stacklevel=2)
    base = base.groupby(match, as_index=False)[["accuracy", "loss"]].mean()
    base = base.rename(columns={"accuracy": "isolated_accuracy", "loss": "isolated_loss"})
    out = final[final["scheme"] != BASELINE].merge(base, on=match, how="left")
    unmatched = out[out["isolated_accuracy"].isna()][["scenario", "scheme", "seed"]].drop_duplicates()
    if len(base) and len(unmatched):
        first = unmatched.iloc[0]
        warnings.warn(f"no isolated run matches scheme {first['scheme']!r} in scenario {first['scenario']!r} seed "
                      f"{first['seed']}" + (f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else "")
                      + ": its gains are left blank", AnalysisWarning, stacklevel=2)
    out["gain"] = (out["accuracy"] - out["isolated_accuracy"]) * 100
    out["loss_change"] = out["loss"] - out["isolated_loss"]
    columns = [*RUN, "institution", "discipline", "accuracy", "isolated_accuracy", "gain", "loss", "isolated_loss", "loss_change"]
    return out[columns]


def gain_summary(gains: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Mean gain per scenario x scheme x institution over seeds, its t-interval, and whether it loses by joining.

    The interval is NaN when there are too few seeds or when it leaves the gains possible against the institution's
    own accuracy alone (:func:`analysis.certainty.gain_range`); ``gain_note`` says which.
    """
    rows = []
    keys = ["scenario", "scheme", "institution", "discipline"]
    for (scenario, scheme, institution, discipline), g in gains.groupby(keys, sort=False):
        lowest, highest = gain_range(g.loc[g["gain"].notna(), "isolated_accuracy"].mean())
        mean, low, high, note = bounded_interval(g["gain"], lowest, highest, level)
        rows.append({
            "scenario": scenario, "scheme": scheme, "institution": institution, "discipline": discipline,
            "seeds": int(g["gain"].notna().sum()), "gain": mean, "gain_low": low, "gain_high": high, "gain_note": note,
            "loss_change": g["loss_change"].mean(), "worse_off": bool(mean < 0),
        })
    columns = [*keys, "seeds", "gain", "gain_low", "gain_high", "gain_note", "loss_change", "worse_off"]
    return order_rows(pd.DataFrame(rows, columns=columns))


def run_accuracy(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run: the merged model's final accuracy, and the mean and worst institution's final accuracy."""
    final = final_table(metrics)
    glob = final[final["institution"] == GLOBAL].groupby("run_id")["accuracy"].mean().rename("global_accuracy")
    inst = final[final["institution"] != GLOBAL].groupby(RUN)["accuracy"].agg(mean_accuracy="mean", worst_accuracy="min")
    runs = final[RUN].drop_duplicates().set_index("run_id")
    out = runs.join(glob).reset_index().merge(inst.reset_index(), on=RUN, how="left")
    return out[[*RUN, "global_accuracy", "mean_accuracy", "worst_accuracy"]]


def fairness_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Fairness per scenario x scheme: worst-off gain, spread and Gini of gains, share better off, discipline parity.

    Gain statistics are over institutions' mean gains across seeds; the standard deviation
    is the population one (the institutions are all there are, not a sample). Accuracy
    parity is the gap between the best and the worst discipline's mean final accuracy.
    Under ``isolated`` every gain is zero by definition.
    """
    per_inst = gain_summary(gain_table(metrics))
    finals = institution_finals(metrics)
    rows = []
    for (scenario, scheme), f in finals.groupby(["scenario", "scheme"], sort=False):
        by_discipline = f.groupby("discipline")["accuracy"].mean()
        if scheme == BASELINE:
            g = pd.Series(0.0, index=sorted(f["institution"].unique()))
        else:
            sel = per_inst[(per_inst["scenario"] == scenario) & (per_inst["scheme"] == scheme)]
            g = sel.set_index("institution")["gain"].dropna()
        rows.append({
            "scenario": scenario, "scheme": scheme,
            "worst_institution": g.idxmin() if len(g) and scheme != BASELINE else None, "worst_gain": g.min() if len(g) else np.nan,
            "gain_std": float(g.std(ddof=0)) if len(g) else np.nan, "gain_gini": gini(g),
            "share_better_off": float((g > 0).mean()) if len(g) else np.nan,
            "accuracy_parity": by_discipline.max() - by_discipline.min() if len(by_discipline) else np.nan,
            "worst_discipline": by_discipline.idxmin() if by_discipline.notna().any() else None,
        })
    columns = ["scenario", "scheme", "worst_institution", "worst_gain", "gain_std", "gain_gini",
               "share_better_off", "accuracy_parity", "worst_discipline"]
    return order_rows(pd.DataFrame(rows, columns=columns))


def summary(metrics: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """The headline table per scheme (mean over seeds): accuracy, mean gain in points, institutions worse off, megabytes.

    Columns: scheme, global_accuracy, mean_accuracy, worst_accuracy, mean_gain, worse_off,
    megabytes; a leading ``scenario`` column appears only when the runs span several scenarios.
    ``worse_off`` counts institutions whose mean gain over seeds is below zero (NA when no
    isolated baseline matches); ``megabytes`` is (bytes_up + bytes_down) / 1e6 summed over a run;
    ``simulated_duration`` is how long a run lasts on the simulated clock, in seconds (:func:`run_costs`).
    ``seeds`` counts the runs behind each row; ``mean_gain_low``/``mean_gain_high`` bound the
    95% t-interval of the mean gain over seeds (each seed's mean over institutions), NaN with
    fewer than :data:`MIN_SEEDS` seeds or when it leaves the range a mean gain can take against the baseline's
    accuracy; ``mean_gain_note`` says which (empty when the interval is shown). ``significantly_worse_off`` counts
    the institutions whose gain's interval lies below zero.
    """
    gains = gain_table(metrics)
    per_run = run_accuracy(metrics)
    per_run = per_run.merge(gains.groupby("run_id")["gain"].mean().rename("mean_gain"), on="run_id", how="left")
    alone = gains[gains["gain"].notna()].groupby("run_id")["isolated_accuracy"].mean().rename("alone")
    per_run = per_run.merge(alone, on="run_id", how="left")
    per_run.loc[per_run["scheme"] == BASELINE, "mean_gain"] = 0.0
    per_run = per_run.merge(run_costs(ledger)[["run_id", "megabytes", "simulated_duration"]], on="run_id", how="left")
    values = ["global_accuracy", "mean_accuracy", "worst_accuracy", "mean_gain", "megabytes", "simulated_duration"]
    groups = per_run.groupby(["scenario", "scheme"], sort=False)
    table = groups[values].mean().reset_index()
    table["seeds"] = groups["run_id"].nunique().to_numpy()
    bounds = [bounded_interval(g["mean_gain"], *gain_range(g["alone"].mean()))[1:] if scheme != BASELINE
              else bounded_interval(g["mean_gain"])[1:] for (_, scheme), g in groups]
    table["mean_gain_low"] = [b[0] for b in bounds]
    table["mean_gain_high"] = [b[1] for b in bounds]
    table["mean_gain_note"] = [b[2] for b in bounds]
    per_inst = gain_summary(gains).dropna(subset=["gain"])
    per_inst = per_inst.assign(sure_loss=per_inst["gain_high"] < 0)
    for column, flag in (("worse_off", "worse_off"), ("significantly_worse_off", "sure_loss")):
        count = per_inst.groupby(["scenario", "scheme"])[flag].sum()
        table[column] = [0 if scheme == BASELINE else count.get((scenario, scheme), pd.NA)
                         for scenario, scheme in zip(table["scenario"], table["scheme"])]
        table[column] = table[column].astype("Int64")
    table = order_rows(table)
    columns = ["scheme", "seeds", "global_accuracy", "mean_accuracy", "worst_accuracy", "mean_gain", "mean_gain_low",
               "mean_gain_high", "mean_gain_note", "worse_off", "significantly_worse_off", "megabytes",
               "simulated_duration"]
    if table["scenario"].nunique() > 1:
        columns = ["scenario", *columns]
    return table[columns]


def run_costs(ledger: pd.DataFrame) -> pd.DataFrame:
    """Ledger totals per run (sums over rounds and institutions): bytes, megabytes, compute, simulated time, epsilon.

    ``compute_seconds`` is measured wall time (it moves with the machine's load, so the report does not show it);
    ``sim_compute_seconds`` the simulated device seconds of training (NaN for ledgers written before it existed).

    ``simulated_seconds`` adds up every institution's simulated seconds (total busy time);
    ``simulated_duration`` is the ledger's clock at the end of the run (``sim_time``: how long the run lasts when
    institutions work in parallel; an asynchronous round does not wait for its slowest member); for tables without
    it, the sum round by round of the slowest participant's simulated seconds. ``epsilon`` is the largest
    privacy spend of any institution by the end of the run, NaN when the scheme adds no noise.
    ``staleness`` is the mean staleness of the updates an asynchronous scheme merged (NaN otherwise).
    """
    sums = ledger.groupby(RUN)[["bytes_up", "bytes_down", "compute_seconds", "simulated_seconds"]].sum()
    # Simulated device seconds: the same under any machine load (compute_seconds is measured wall time; it is not).
    sums["sim_compute_seconds"] = (ledger.groupby(RUN)["sim_compute_seconds"].sum(min_count=1)
                                   if "sim_compute_seconds" in ledger else np.nan)
    per_round = ledger.groupby([*RUN, "round"])["simulated_seconds"].max()
    sums["simulated_duration"] = per_round.groupby(level=RUN).sum()
    if "sim_time" in ledger:
        sums["simulated_duration"] = ledger.groupby(RUN)["sim_time"].max().fillna(sums["simulated_duration"])
    sums["epsilon"] = ledger.groupby(RUN)["epsilon"].max()
    # Asynchronous schemes: mean server steps between an update's dispatch and its merge (NaN for synchronous ones).
    sums["staleness"] = ledger.groupby(RUN)["staleness"].mean() if "staleness" in ledger else np.nan
    sums["megabytes"] = (sums["bytes_up"] + sums["bytes_down"]) / 1e6
    # What one institution sends and receives in a round it takes part in: LoRA adapters vs a whole model at a glance.
    took_part = ledger[ledger["participated"] & (ledger["institution"] != GLOBAL)]
    per_member = (took_part["bytes_up"] + took_part["bytes_down"]).groupby([took_part[c] for c in RUN]).mean()
    sums["mb_per_member_round"] = per_member.reindex(sums.index).fillna(0.0) / 1e6
    return sums.reset_index().astype({"bytes_up": "float64", "bytes_down": "float64"})


def cost_table(metrics: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """Costs per scenario x scheme (mean over seeds), accuracy per megabyte, and membership of the Pareto front.

    The front maximises mean institution accuracy and minimises megabytes, and epsilon too
    once some scheme reports it; it is taken within each scenario. For the front, a scheme
    without privacy noise (epsilon NaN) counts as epsilon 0 when it exchanges nothing (the
    data never leaves) and as unbounded epsilon otherwise (no formal guarantee).
    """
    per_run = run_costs(ledger).merge(run_accuracy(metrics)[["run_id", "mean_accuracy"]], on="run_id", how="outer")
    per_run["scenario"] = per_run["scenario"].fillna(per_run["run_id"].map(metrics.groupby("run_id")["scenario"].first()))
    per_run["scheme"] = per_run["scheme"].fillna(per_run["run_id"].map(metrics.groupby("run_id")["scheme"].first()))
    values = ["bytes_up", "bytes_down", "megabytes", "mb_per_member_round", "compute_seconds", "sim_compute_seconds",
              "simulated_seconds", "simulated_duration", "staleness", "epsilon", "mean_accuracy"]
    table = per_run.groupby(["scenario", "scheme"], sort=False)[values].mean()
    table["runs"] = per_run.groupby(["scenario", "scheme"], sort=False)["run_id"].nunique()
    table = table.reset_index()
    mb = table["megabytes"]
    table["accuracy_per_mb"] = np.where(mb > 0, table["mean_accuracy"] / mb.where(mb > 0), np.nan)
    table["pareto"] = False
    for _, idx in table.groupby("scenario").groups.items():
        rows = table.loc[idx]
        if rows["epsilon"].notna().any():
            rows = rows.assign(epsilon=rows["epsilon"].fillna(rows["megabytes"].gt(0).map({True: np.inf, False: 0.0})))
        front = pareto_front(rows, maximise=["mean_accuracy"], minimise=["megabytes", "epsilon"])
        table.loc[idx, "pareto"] = front
    return order_rows(table[["scenario", "scheme", "runs", *values, "accuracy_per_mb", "pareto"]])


def pareto_front(df: pd.DataFrame, maximise: Sequence[str] = (), minimise: Sequence[str] = ()) -> np.ndarray:
    """Boolean mask of the rows no other row dominates (as good in every criterion and better in one).

    A criterion whose column is entirely NaN is ignored (epsilon before any scheme reports
    it); a row with NaN in a criterion that is used is never on the front. Equal rows are
    both on the front. With no usable criterion every row is.
    """
    both = set(maximise) & set(minimise)
    if both:
        raise ValueError(f"columns both maximised and minimised: {sorted(both)}")
    used = [(c, 1.0) for c in maximise if df[c].notna().any()] + [(c, -1.0) for c in minimise if df[c].notna().any()]
    if not used:
        return np.ones(len(df), dtype=bool)
    better = np.column_stack([df[c].to_numpy(dtype=float) * sign for c, sign in used])  # larger is better
    valid = ~np.isnan(better).any(axis=1)
    front = valid.copy()
    candidates = better[valid]
    for i in np.flatnonzero(valid):
        dominated = (candidates >= better[i]).all(axis=1) & (candidates > better[i]).any(axis=1)
        front[i] = not dominated.any()
    return front


def round_curve(metrics: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Per scenario x scheme x round: mean over runs of the merged model's metric, with its min and max over runs.

    Schemes that report no global row (isolated) use each run's mean over institutions
    instead; the ``source`` column says which.
    """
    df = metrics[metrics["metric"] == metric]
    has_global = df[df["institution"] == GLOBAL].groupby("run_id").size()
    glob = df[df["institution"] == GLOBAL]
    inst = df[(df["institution"] != GLOBAL) & ~df["run_id"].isin(has_global.index)]
    per_run = pd.concat([
        glob.groupby([*RUN, "round"])["value"].mean().reset_index().assign(source="global model"),
        inst.groupby([*RUN, "round"])["value"].mean().reset_index().assign(source="mean of institutions"),
    ])
    curve = per_run.groupby(["scenario", "scheme", "round", "source"])["value"].agg(["mean", "min", "max", "count"])
    curve = curve.reset_index().rename(columns={"min": "low", "max": "high", "count": "runs"})
    return order_rows(curve.sort_values(["scenario", "scheme", "round"]))


def order_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Sort rows by scenario, then schemes in reading order, keeping the order of rows within each scheme."""
    if df.empty:
        return df.reset_index(drop=True)
    rank = df["scheme"].map({s: i for i, s in enumerate(scheme_order(df["scheme"]))})
    keys = ["scenario", "_rank"] if "scenario" in df else ["_rank"]
    return df.assign(_rank=rank).sort_values(keys, kind="stable").drop(columns="_rank").reset_index(drop=True)
