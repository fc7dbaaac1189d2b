"""The money part of the report's "What it costs": money, energy, time and cost to target per scheme, who pays what.

Tables come from :func:`analysis.costs.cost_tables`; sentences are built from their numbers only.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from analysis import plots
from analysis.page import OWN_TEST, fmt, image, table
from sim.core.types import spoken

NO_COST_MODEL = ("No money, energy or time to target: these runs carry no cost model (their config.yaml has no costs "
                 "group, or their ledger no sim_compute_seconds; they were made by an older collabsim). Rerun them to "
                 "price them at conf/costs/ prices.")


UNITS = ((1.0, "", ""), (1e3, "m", "thousandths"), (1e6, "µ", "millionths"), (1e9, "n", "billionths"))
"""(factor, prefix, words): amounts are shown in the largest unit in which the biggest of them is at least 1."""


def money_unit(values, currency: str) -> tuple[float, str, str]:
    """(factor, unit, what the unit is): e.g. (1e6, 'µUSD', 'µUSD = millionths of a USD') for runs costing millionths."""
    x = pd.to_numeric(pd.Series(list(values), dtype="object"), errors="coerce").abs()
    top = x[x > 0].max() if (x > 0).any() else np.nan
    for factor, prefix, words in UNITS:
        if pd.isna(top) or top * factor >= 1 or factor == UNITS[-1][0]:
            return factor, f"{prefix}{currency}", f"{prefix}{currency} = {words} of a {currency}" if prefix else ""
    raise AssertionError("unreachable")


def money_text(value) -> str:
    """An amount for reading, in whatever unit the caller scaled it to: never in e-notation ('< 0.01' below a cent of
    the unit; :func:`money_unit` picks a unit in which the largest amount is at least 1)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value == 0:
        return "0"
    if abs(value) < 0.01:
        return "< 0.01" if value > 0 else "> −0.01"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.2f}"


def scale_text(money: pd.DataFrame) -> str:
    """One sentence on the scale the amounts assume (``costs.scale``) and how to price another."""
    scale = money["scale"].iloc[0] if "scale" in money and len(money) else 1.0
    how = ("edit costs.scale in the run directory's config.yaml and rerun python -m analysis report, or pass "
           "costs.scale=... to the command")
    if pd.isna(scale):
        return "The runs price at different scales (costs.scale), so their amounts are not comparable."
    if scale == 1:
        return ("Amounts assume the simulated scale (costs.scale = 1): the model and data as simulated, often a toy; to "
                f"price a real deployment that does N times this work, {how}.")
    return (f"Amounts assume a declared real-world scale: device-hours and GB are {scale:,.10g} times the simulated ones "
            f"(costs.scale = {scale:,.10g}); to price another, {how}.")


def seconds_text(value) -> str:
    """Simulated seconds for reading: three significant figures below 100 (toy runs last fractions of a second)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def guide(currency: str) -> dict[str, tuple[str, str, str]]:
    """Column guide of the money tables (amounts arrive as text from :func:`money_text`, hence kind 'money')."""
    c = currency
    return {
        "money": (f"Money ({c})", "Per run: device-hours, GB and kWh times each institution's prices (conf/costs/), "
                  "all institutions together.", "money"),
        "compute_money": (f"Compute ({c})", "The CPU- and GPU-hours part of the money.", "money"),
        "transfer_money": (f"Transfer ({c})", "The part for bytes sent and received.", "money"),
        "energy_money": (f"Energy ({c})", "kWh times the price per kWh (0 when device prices include power).", "money"),
        "cpu_hours": ("CPU-hours", "Simulated busy time of the declared CPU cores, per run.", "float"),
        "gpu_hours": ("GPU-hours", "Simulated busy time of the declared GPUs, per run.", "float"),
        "kwh": ("Energy (kWh)", "CPU-hours x watts per core + GPU-hours x watts per GPU, per run.", "float"),
        "co2_kg": ("CO2e (kg)", "kWh times the grid's kg CO2e per kWh.", "float"),
        "duration": ("Duration (s)", "Simulated seconds from the start to the end of the run (sim_time of its last round).",
                     "money"),
        "reached": ("Reached", "Seeds whose accuracy at the selected round (the summary's figure) reaches the target.",
                    "text"),
        "time_to_target": ("Time to target (s)", "Simulated seconds until the first scored round at the target, mean over "
                           "the seeds that reach it.", "money"),
        "cost_to_target": (f"Cost to target ({c})", "Money spent up to and including that round, mean over the seeds "
                           "that reach it.", "money"),
        "pareto_money": ("Pareto (money)", "Yes when no other scheme is both more accurate and cheaper.", "bool"),
        "central_money": (f"Central part ({c})", "Its share of training on pooled data: its own devices, busy while the "
                          "consortium's combined compute trains.", "money"),
        "share_paid": ("Share paid", "Its part of everything the scheme costs.", "pct"),
    }


def _unit(money: pd.DataFrame) -> tuple[float, str, str]:
    """The unit a scenario's money is shown in: chosen from the largest amount per run."""
    return money_unit(money["money"], str(money["currency"].iloc[0]))


def money_section(money: pd.DataFrame, per_inst: pd.DataFrame, goal: pd.DataFrame, refs: set[str] = frozenset()) -> str:
    """HTML for one scenario: the target, the scheme table, accuracy against money, and who pays what.

    Amounts are in one readable unit (:func:`money_unit`: µUSD for millionths of a dollar) and the scale they
    assume is said (:func:`scale_text`); reference schemes (``refs``) are labelled as such.
    """
    if money.empty:
        return f'<p class="note">{html.escape(NO_COST_MODEL)}</p>'
    factor, currency, unit_words = _unit(money)
    extra = guide(currency)
    shown = money.assign(reached=[f"{r} of {n}" for r, n in zip(money["reached"], money["runs"])],
                         scheme=money["scheme"].map(lambda s: f"{s} (reference)" if s in refs else s))
    for column in ("money", "compute_money", "transfer_money", "energy_money", "cost_to_target"):
        shown[column] = (shown[column] * factor).map(money_text)
    for column in ("duration", "time_to_target"):  # kind "money" in the guide: shown as the text made here; duration in tables/
        shown[column] = shown[column].map(seconds_text)
    columns = ["scheme", "money", "compute_money", "transfer_money",  # device-hours are in tables/money.csv
               *(["energy_money"] if (money["energy_money"] > 0).any() else []),
               *[c for c in ("kwh", "co2_kg") if money[c].notna().any()],
               "reached", "time_to_target", "cost_to_target", "mean_accuracy", "pareto_money"]
    lead = " ".join(filter(None, [target_text(goal), scale_text(money), unit_words and f"{unit_words}."]))
    out = f'<h3>Money, energy and time to target</h3><p class="lead">{html.escape(lead)}</p>'
    out += table(shown, columns, extra=extra)
    out += image(plots.png_bytes(plots.pareto_plot(money.assign(money=money["money"] * factor), "Mean accuracy against money",
                                                   x="money", front="pareto_money",
                                                   xlabel=f"Money per run ({currency}, all institutions)")),
                 "Mean accuracy against money",
                 "A scheme is on this Pareto front when no other is both more accurate and cheaper in money.")
    out += "<h3>Who pays what</h3>" + who_pays(per_inst.assign(money=per_inst["money"] * factor), extra)
    out += ('<p class="note">Money per run, mean over seeds: device-hours (simulated busy seconds x the declared CPUs and '
            "GPUs) and GB sent and received, at each institution's prices. Training on pooled data runs on the "
            "consortium's combined compute, so each institution pays for its own devices busy during it (Central "
            "part).</p>")
    return out


def who_pays(per_inst: pd.DataFrame, extra: dict) -> str:
    """Institutions down, schemes across: what each pays per run and its share of the scheme's total."""
    cells = per_inst.assign(cell=[f"{money_text(v)} ({fmt(s, 'pct')})" for v, s in zip(per_inst["money"], per_inst["share_paid"])])
    wide = cells.pivot_table(index="institution", columns="scheme", values="cell", aggfunc="first", sort=False)
    schemes = list(dict.fromkeys(per_inst["scheme"]))
    wide = wide.reindex(columns=schemes).reset_index()
    heads = {s: (s, f"Money per run under {s}, and in brackets the institution's share of it.", "money") for s in schemes}
    return table(wide.fillna("—"), ["institution", *schemes], extra={**extra, **heads})


def target_text(goal: pd.DataFrame) -> str:
    """One sentence on the target accuracy and where it comes from."""
    if goal.empty:
        return "No target accuracy: no round of these runs scores every institution."
    g = goal.iloc[0]
    said = f"Target: {fmt(g['target'], 'pct')} mean accuracy on {OWN_TEST}"
    if pd.notna(g["fraction"]):
        said += (f", {g['fraction']:.0%} of the best mean accuracy in the summary ({g['best_scheme']}, "
                 f"{fmt(g['best_accuracy'], 'pct')}, at the selected round, mean over seeds); set another with "
                 "python -m analysis report --target")
    else:
        said += " (set with --target)"
    return said + (". A run reaches it when its accuracy at the selected round, the summary's figure, does; its time "
                   "to target is the simulated time (the ledger's sim_time) at the first scored round at the target.")


def cost_findings(money: pd.DataFrame, per_inst: pd.DataFrame, goal: pd.DataFrame, refs: set[str] = frozenset(),
                  ) -> list[tuple[str, str]]:
    """Which scheme reaches the target for the least money and the soonest, which never do, and who pays most.

    Reference runs (``refs``: nobody cheating) are never ranked.
    """
    if money.empty or goal.empty:
        return []
    factor, currency, unit_words = _unit(money)
    unit = f"{currency} ({unit_words.split('= ')[1]})" if unit_words else currency
    money = money[~money["scheme"].isin(refs)]
    money, per_inst = money.assign(**{c: money[c] * factor for c in ("money", "cost_to_target")}), \
        per_inst.assign(money=per_inst["money"] * factor)
    target = fmt(goal["target"].iloc[0], "pct")
    there = money[money["reached"] > 0].dropna(subset=["cost_to_target"])
    every = there[there["reached"] >= there["runs"]]
    some = there[there["reached"] < there["runs"]]
    never = list(money.loc[money["reached"] == 0, "scheme"])
    if there.empty:
        text = f"no scheme reaches the target of {target} mean accuracy at its selected round"
    else:
        text = (f"{spoken(list(every['scheme']))} {'reaches' if len(every) == 1 else 'reach'} the target of {target} "
                "mean accuracy in every seed" if len(every) else
                f"no scheme reaches the target of {target} mean accuracy in every seed")
        if len(some):  # counted by seed, beside the scheme's mean accuracy: a few seeds never read as the scheme
            text += "; " + spoken([f"{r.scheme} in {r.reached} of {r.runs} seeds (mean accuracy "
                                   f"{fmt(r.mean_accuracy, 'pct')})" for r in some.itertuples()]) + " only"
        pool = every if len(every) else there
        cheap = pool.loc[pool["cost_to_target"].idxmin()]
        who = (f"{cheap['scheme']} gets there for the least money" if len(pool) > 1 else f"{cheap['scheme']} gets there")
        text += (f"; {'of those' if len(every) else 'of the seeds that reach it'}, {who}, "
                 f"{money_text(cheap['cost_to_target'])} {unit} after {seconds_text(cheap['time_to_target'])} simulated "
                 "seconds")
        fast = pool.dropna(subset=["time_to_target"])
        if len(fast) and fast.loc[fast["time_to_target"].idxmin(), "scheme"] != cheap["scheme"]:
            f = fast.loc[fast["time_to_target"].idxmin()]
            text += (f", and {f['scheme']} the soonest, after {seconds_text(f['time_to_target'])} seconds for "
                     f"{money_text(f['cost_to_target'])} {currency}")
        if never:
            text += f"; {spoken(never)} never {'reaches' if len(never) == 1 else 'reach'} it in these runs"
    out = [("Time and money to target", text + ".")]
    best = money.dropna(subset=["mean_accuracy"])
    if len(best):
        top = best.loc[best["mean_accuracy"].idxmax()]
        payers = per_inst[per_inst["scheme"] == top["scheme"]].dropna(subset=["share_paid"])
        if len(payers):
            p = payers.loc[payers["money"].idxmax()]
            out.append(("Who pays", f"the most accurate scheme, {top['scheme']}, costs {money_text(top['money'])} "
                        f"{unit} per run; {p['institution']} pays the most of it, {money_text(p['money'])} "
                        f"{currency} ({fmt(p['share_paid'], 'pct')})."))
    return out


__all__ = ["NO_COST_MODEL", "cost_findings", "money_section", "money_text", "money_unit", "scale_text", "target_text",
           "who_pays"]
