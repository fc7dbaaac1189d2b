"""Money, energy and time to a target accuracy, from the ledger and each run's prices (``costs`` in its config.yaml).

How the ledger becomes money (all per round x institution, then summed):

- **Device-hours.** An institution's row books ``sim_compute_seconds``: the simulated seconds
  its declared ``cpus``/``gpus`` were busy training. CPU-hours = sim_compute_seconds x cpus /
  3600, GPU-hours likewise. One that declares less than a tenth of a core (none, say) is
  charged a tenth of a core, as the simulated clock (sim/core/clock.py) runs it on one.
- **Central compute.** The ``global`` row books training the coordinator does on pooled data;
  the clock runs it on the consortium's combined compute, every institution's cpus and gpus
  together. So those seconds are charged to the institutions: each pays for its own devices
  busy that long, at its own prices (an institution bringing more hardware pays more of the
  pooled training). No separate coordinator is charged.
- **Transfer.** Each institution pays for the bytes crossing its own link, up and down, at its
  price per GB (1e9 bytes); the same bytes are not charged again at the coordinator.
- **Energy.** kWh = (CPU-hours x cpu_watts + GPU-hours x gpu_watts) / 1000, priced at ``kwh``
  on top of the device prices (0 by default: cloud prices include power); CO2e = kWh x
  ``co2_per_kwh``. Without watts (null) there are no energy figures.

Money is the sum of usage x price over :data:`CHARGES`, so a new ledger quantity (compute
handed to a partner, say) is one more (usage column, price key) pair.

**Scale.** ``costs.scale`` (default 1) multiplies every run's device-hours and GB (and so kWh,
CO2e and money) before pricing: the simulation's toy model and data cost millionths of a dollar,
so a reader who wants a real-world figure declares how many times more work a real deployment
does (a larger model, more data) and the report says which scale it priced at. Simulated time is
not scaled.

**Time to target** reads the same selected numbers as the summary. The target is ``--target`` if
given, else :data:`TARGET_FRACTION` of the best *mean accuracy* in the summary (each run's mean
over institutions at the round its selection rule picked, :func:`analysis.metrics.run_accuracy`,
mean over seeds; reference runs aside). A run reaches the target when that selected accuracy of
its own does; its time to target is then the ledger's ``sim_time`` at the first scored round whose
mean accuracy over institutions reaches it (round 0: 0 seconds; when no single round does, as
per-institution selection can mix rounds, the last round any institution's model was selected
from), its cost to target the money of every round up to that one. Per scheme both are means over
the seeds that reach it, and ``reached`` says how many do. A run that touches the target in some
round but whose selected accuracy is below it does not count as reaching it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from analysis.metrics import GLOBAL, RUN, final_round, order_rows, pareto_front, run_accuracy
from analysis.runs import read_config
from sim.core.clock import FLOPS_PER_CPU, FLOPS_PER_GPU, MIN_CPUS  # the clock's floor: what it runs, it charges
from sim.core.results import TableError, read_one
from sim.core.schema import PRICES

TARGET_FRACTION = 0.95
"""Default target: this share of the best mean accuracy any scheme reaches (close to the best, reachable in noise)."""
USAGE = ["cpu_hours", "gpu_hours", "gb", "kwh", "co2_kg"]
CHARGES = (("cpu_hours", "cpu_hour", "compute_money"), ("gpu_hours", "gpu_hour", "compute_money"),
           ("gb", "gb", "transfer_money"), ("kwh", "kwh", "energy_money"))
"""(usage column, price key, money column it adds to): money = sum of usage x price over these."""
MONEY = ["compute_money", "transfer_money", "energy_money", "money"]


@dataclass(frozen=True)
class Prices:
    """One run's prices: consortium-wide defaults and per-institution overrides (the ``costs`` config group)."""

    currency: str = "USD"
    base: Mapping[str, float | None] = field(default_factory=dict)
    overrides: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    scale: float = 1.0
    """How many times the simulated work a real deployment does (``costs.scale``): usage is multiplied by it."""

    def of(self, institution: str) -> dict[str, float]:
        """Every price key for one institution (NaN where a key is null: no energy or emissions figures)."""
        merged = {**self.base, **(self.overrides.get(institution) or {})}
        return {k: np.nan if merged.get(k) is None else float(merged[k]) for k in PRICES}


def prices_from_config(config: Mapping) -> Prices | None:
    """The prices a run's config records (checked as the run checked them), or None for a run made without a cost model.

    A key missing from an older costs group counts as 0 (a price) or null (watts, emissions).
    """
    costs = config.get("costs") if isinstance(config, Mapping) else None
    if not isinstance(costs, Mapping):
        return None
    from sim.core.schema import check_costs

    overrides = costs.get("institutions") or {}
    check_costs(costs, list(overrides) if isinstance(overrides, Mapping) else [])  # a hand-edited config.yaml: one line
    base = {k: costs.get(k, None if PRICES[k].null else 0.0) for k in PRICES}
    return Prices(str(costs.get("currency") or "USD"), base, {k: dict(v) for k, v in overrides.items()},
                  float(costs.get("scale") or 1.0))


def run_prices(configs: Mapping[str, Mapping]) -> dict[str, Prices]:
    """run_id -> prices, from each directory's config.yaml (a compare's runs/*/config.yaml price what it does not).

    The directory's own config wins, so repricing a compare is one edit of its config.yaml.
    """
    out: dict[str, Prices] = {}
    for directory, config in configs.items():
        found = [(p.parent, read_config(p.parent)) for p in sorted(Path(directory).glob("runs/*/config.yaml"))]
        found.append((Path(directory), config))
        for where, cfg in found:
            prices, ledger = prices_from_config(cfg), where / "ledger.parquet"
            if prices is None or not ledger.is_file():
                continue
            try:
                ids = read_one("ledger", ledger, columns=["run_id"])["run_id"].dropna().unique()
            except TableError:
                continue  # a damaged sub-run's file; the directory's own tables were checked on loading
            out.update({str(i): prices for i in ids})
    return out


def priced_ledger(ledger: pd.DataFrame, institutions: pd.DataFrame, prices: Mapping[str, Prices]) -> pd.DataFrame:
    """One row per run x round x institution that pays: device-hours, GB, energy and money (see the module docstring).

    Only runs with prices and a ledger that books ``sim_compute_seconds`` are priced; ``work``
    says whether a row is the institution's own ("own") or its part of central training ("central").
    """
    if "sim_compute_seconds" not in ledger:
        return pd.DataFrame(columns=[*RUN, "round", "institution", "work", *USAGE, *MONEY])
    booked = ledger.groupby("run_id")["sim_compute_seconds"].transform(lambda s: s.notna().any())
    lg = ledger[booked & ledger["run_id"].isin(list(prices))]
    devices = institutions[["run_id", "institution", "cpus", "gpus"]].drop_duplicates(["run_id", "institution"])
    cpus, gpus = devices["cpus"].fillna(0.0), devices["gpus"].fillna(0.0)
    slow = cpus + gpus * FLOPS_PER_GPU / FLOPS_PER_CPU < MIN_CPUS  # the clock runs these on a tenth of a core
    devices = devices.assign(cpus=cpus.where(~slow, MIN_CPUS), gpus=gpus.where(~slow, 0.0))
    own = lg[lg["institution"] != GLOBAL].merge(devices, on=["run_id", "institution"], how="left").assign(work="own")
    own[["cpus", "gpus"]] = own[["cpus", "gpus"]].fillna({"cpus": MIN_CPUS, "gpus": 0.0})
    central = lg[(lg["institution"] == GLOBAL) & (lg["sim_compute_seconds"].fillna(0) > 0)]
    central = central[[*RUN, "round", "sim_compute_seconds"]].merge(devices, on="run_id")
    rows = pd.concat([own, central.assign(bytes_up=0, bytes_down=0, work="central")], ignore_index=True)
    seconds = rows["sim_compute_seconds"].fillna(0.0).astype(float)
    scale = rows["run_id"].map({r: p.scale for r, p in prices.items()}).fillna(1.0).astype(float)  # costs.scale
    rows["cpu_hours"] = seconds * rows["cpus"] / 3600 * scale
    rows["gpu_hours"] = seconds * rows["gpus"] / 3600 * scale
    moved = rows["data_bytes"].fillna(0).astype(float) if "data_bytes" in rows else 0.0  # raw data to a compute partner
    rows["gb"] = (rows["bytes_up"].fillna(0).astype(float) + rows["bytes_down"].fillna(0).astype(float) + moved) / 1e9 \
        * scale
    pairs = rows[["run_id", "institution"]].drop_duplicates()
    table = pd.DataFrame([{"run_id": r, "institution": i, **{f"price_{k}": v for k, v in prices[r].of(i).items()}}
                          for r, i in pairs.itertuples(index=False)],
                         columns=["run_id", "institution", *(f"price_{k}" for k in PRICES)])
    rows = rows.merge(table, on=["run_id", "institution"], how="left")
    watts = rows[["price_cpu_watts", "price_gpu_watts"]]
    rows["kwh"] = ((rows["cpu_hours"] * watts["price_cpu_watts"].fillna(0)
                    + rows["gpu_hours"] * watts["price_gpu_watts"].fillna(0)) / 1000).where(watts.notna().any(axis=1))
    rows["co2_kg"] = rows["kwh"] * rows["price_co2_per_kwh"]
    for column in MONEY:
        rows[column] = 0.0
    for usage, price, part in CHARGES:
        charge = rows[usage].fillna(0.0) * rows[f"price_{price}"].fillna(0.0)
        rows[part] += charge
        rows["money"] += charge
    return rows[[*RUN, "round", "institution", "work", *USAGE, *MONEY]]


def run_money(priced: pd.DataFrame) -> pd.DataFrame:
    """Per run: usage and money summed over rounds and institutions (kWh and CO2e NaN where not priced)."""
    sums = priced.groupby(RUN)[[*USAGE, *MONEY]].sum(min_count=1).reset_index()
    return sums.assign(**{c: sums[c].fillna(0.0) for c in ["cpu_hours", "gpu_hours", "gb", *MONEY]})


def accuracy_by_round(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run x round: mean over institutions of accuracy on their own test split, on rounds every institution was scored."""
    acc = metrics[(metrics["metric"] == "accuracy") & (metrics["institution"] != GLOBAL)]
    per = acc.groupby([*RUN, "round"]).agg(accuracy=("value", "mean"), scored=("institution", "nunique")).reset_index()
    everyone = per.groupby("run_id")["scored"].transform("max")
    return per[per["scored"] == everyone].drop(columns="scored").reset_index(drop=True)


def targets(selected: pd.DataFrame, target: float | None = None, refs: frozenset | set = frozenset()) -> pd.DataFrame:
    """Per scenario: the target accuracy, and the best mean accuracy in the summary (scheme, mean over seeds of each
    run's selected accuracy) it was taken from; reference schemes (``refs``) are never the best.

    ``selected`` is :func:`analysis.metrics.run_accuracy` (one row per run, ``mean_accuracy`` at the selected round).
    """
    columns = ["scenario", "target", "fraction", "best_scheme", "best_accuracy"]
    means = selected[~selected["scheme"].isin(refs)].groupby(["scenario", "scheme"])["mean_accuracy"].mean()
    rows = []
    for scenario, g in means.dropna().reset_index().groupby("scenario", sort=True):
        best = g.loc[g["mean_accuracy"].idxmax()]
        rows.append({"scenario": scenario, "target": TARGET_FRACTION * best["mean_accuracy"] if target is None else target,
                     "fraction": TARGET_FRACTION if target is None else np.nan, "best_scheme": best["scheme"],
                     "best_accuracy": best["mean_accuracy"]})
    return pd.DataFrame(rows, columns=columns)


def time_to_target(metrics: pd.DataFrame, ledger: pd.DataFrame, priced: pd.DataFrame, goal: pd.DataFrame) -> pd.DataFrame:
    """Per run: whether its selected accuracy reaches its scenario's target, the first scored round at it, that round's
    ``sim_time`` and the money and kWh spent by then (see the module docstring)."""
    selected = run_accuracy(metrics)[[*RUN, "mean_accuracy"]].merge(goal[["scenario", "target"]], on="scenario")
    curve = accuracy_by_round(metrics).merge(goal[["scenario", "target"]], on="scenario")
    hit = curve[curve["accuracy"] >= curve["target"]].groupby("run_id")["round"].min()
    picked = final_round(metrics[metrics["institution"] != GLOBAL]).groupby("run_id")["round"].max()
    runs = selected[[*RUN, "target"]].reset_index(drop=True)
    reached = (selected["mean_accuracy"] >= selected["target"]).to_numpy()
    runs["round"] = [runs_round if ok else np.nan for runs_round, ok in
                     zip(runs["run_id"].map(hit).fillna(runs["run_id"].map(picked)), reached)]
    clock = ledger.groupby(["run_id", "round"])["sim_time"].max() if "sim_time" in ledger else pd.Series(dtype=float)
    spent = priced.groupby(["run_id", "round"])[["money", "kwh"]].sum(min_count=1)
    out = []
    for r, ok in zip(runs.itertuples(index=False), reached):
        row = {**r._asdict(), "reached": bool(ok), "time_to_target": np.nan, "cost_to_target": np.nan,
               "kwh_to_target": np.nan}
        if row["reached"]:
            mine = spent.loc[r.run_id] if r.run_id in spent.index.get_level_values(0) else spent.iloc[:0]
            mine = mine[mine.index.get_level_values(-1) <= r.round]  # every round up to the one that reaches it
            row["time_to_target"] = 0.0 if r.round == 0 else clock.get((r.run_id, r.round), np.nan)
            row["cost_to_target"] = float(mine["money"].sum())
            row["kwh_to_target"] = float(mine["kwh"].sum()) if mine["kwh"].notna().any() else np.nan
        out.append(row)
    return pd.DataFrame(out, columns=[*RUN, "target", "round", "reached", "time_to_target", "cost_to_target", "kwh_to_target"])


def scheme_costs(metrics: pd.DataFrame, ledger: pd.DataFrame, priced: pd.DataFrame, per_run_target: pd.DataFrame,
                 currency: str) -> pd.DataFrame:
    """Per scenario x scheme (mean over seeds): money, energy, simulated duration, time and cost to target, and the
    Pareto front of mean accuracy against money."""
    per_run = run_money(priced).merge(run_accuracy(metrics)[["run_id", "mean_accuracy"]], on="run_id", how="left")
    if "sim_time" in ledger:
        per_run["duration"] = per_run["run_id"].map(ledger.groupby("run_id")["sim_time"].max())
    else:
        per_run["duration"] = np.nan
    keys = ["scenario", "scheme"]
    values = [*USAGE, *MONEY, "duration", "mean_accuracy"]
    table = per_run.groupby(keys, sort=False)[values].mean()
    table["runs"] = per_run.groupby(keys, sort=False)["run_id"].nunique()
    reach = per_run_target[per_run_target["run_id"].isin(per_run["run_id"])].groupby(keys, sort=False)
    table["reached"] = reach["reached"].sum().astype(int)
    ok = per_run_target[per_run_target["reached"]].groupby(keys, sort=False)
    for column in ("time_to_target", "cost_to_target", "kwh_to_target"):
        table[column] = ok[column].mean()
    table = table.reset_index()
    table["reached"] = table["reached"].fillna(0).astype(int)
    table["currency"] = currency
    table["pareto_money"] = False
    for _, idx in table.groupby("scenario").groups.items():
        table.loc[idx, "pareto_money"] = pareto_front(table.loc[idx], maximise=["mean_accuracy"], minimise=["money"])
    return order_rows(table[[*keys, "runs", *values, "reached", "time_to_target", "cost_to_target", "kwh_to_target",
                             "currency", "pareto_money"]])


def institution_costs(priced: pd.DataFrame) -> pd.DataFrame:
    """Who pays what: per scenario x scheme x institution, mean over seeds of usage and money, central training's part,
    and the institution's share of its scheme's money."""
    keys = ["scenario", "scheme", "institution"]
    per_run = priced.groupby([*RUN, "institution"])[[*USAGE, *MONEY]].sum(min_count=1).reset_index()
    central = priced[priced["work"] == "central"].groupby([*RUN, "institution"])["money"].sum().rename("central_money")
    per_run = per_run.merge(central.reset_index(), on=[*RUN, "institution"], how="left").fillna({"central_money": 0.0})
    table = per_run.groupby(keys, sort=False)[[*USAGE, *MONEY, "central_money"]].mean().reset_index()
    total = table.groupby(["scenario", "scheme"])["money"].transform("sum")
    table["share_paid"] = (table["money"] / total).where(total > 0)
    return order_rows(table)


def cost_tables(metrics: pd.DataFrame, ledger: pd.DataFrame, institutions: pd.DataFrame, configs: Mapping[str, Mapping],
                target: float | None = None, refs: frozenset | set = frozenset()) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The report's cost tables (money, money_per_institution, time_to_target, targets) and notes on what was left out.

    Runs without prices (made before the cost model) or without ``sim_compute_seconds`` in
    their ledger are left out with one note; with none left there are no tables.
    """
    prices = run_prices(configs)
    priced = priced_ledger(ledger, institutions, prices)
    all_runs, priced_runs = set(metrics["run_id"].dropna()), set(priced["run_id"])
    notes = []
    if all_runs - priced_runs:
        left = len(all_runs - priced_runs)
        notes.append(f"{left} of {len(all_runs)} run{'s' if len(all_runs) != 1 else ''} carry no cost model (their "
                     "config.yaml has no costs group or their ledger no sim_compute_seconds: made by an older collabsim) "
                     "and are left out of money, energy and time to target; rerun them to price them.")
    if not priced_runs:
        return {}, notes
    currencies = sorted({prices[r].currency for r in priced_runs})
    if len(currencies) > 1:
        notes.append(f"the runs price in different currencies ({', '.join(currencies)}); their sums mix them.")
    mt = metrics[metrics["run_id"].isin(priced_runs)]
    scales = sorted({prices[r].scale for r in priced_runs})
    if len(scales) > 1:
        notes.append(f"the runs price at different scales (costs.scale {', '.join(f'{s:g}' for s in scales)}); their "
                     "sums mix them.")
    goal = targets(run_accuracy(mt), target, refs)
    per_run = time_to_target(mt, ledger, priced, goal)
    money = scheme_costs(mt, ledger, priced, per_run, "/".join(currencies)).assign(
        scale=scales[0] if len(scales) == 1 else np.nan)
    tables = {"money": money,
              "money_per_institution": institution_costs(priced), "time_to_target": per_run, "targets": goal}
    return tables, notes
