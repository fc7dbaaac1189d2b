"""What drives each outcome: Sobol' indices of a sensitivity sweep's levers, with bootstrap intervals.

A sensitivity sweep (``search: sobol``, :mod:`sim.sweep.design`) runs every point of a
Saltelli design under each crossed scheme; its directory holds ``design.json`` (the levers,
N, the seed) and ``trials.parquet`` (each trial's ``design_row``). Per scheme and outcome,
the outcome of each design point (mean over seeds) goes through SALib's Sobol' estimator
(``SALib.analyze.sobol``: Saltelli 2010 for first order, Jansen for total), which pairs the
rows by their place in the design. Outcomes, per run against the isolated run of the same
design point and seed:

- **mean gain**: mean over institutions of the gain in accuracy points (analysis.metrics.gain_table);
- **worst-off gain**: the lowest institution's gain;
- **gain of <institution>**: each institution's own;
- **money to target**: what the run spends (analysis.costs: device-hours, transfer, energy at
  its prices) until its mean accuracy first reaches the target: ``--target ACC``, or by default
  95% of the accuracy the run itself ends with, so every run reaches it (a run that never reaches
  a fixed target has no money to target, and an outcome with gaps gets no indices).

First-order index S1: the share of the outcome's variance that a lever explains alone;
total index ST: alone and through its interactions with the others. Intervals are SALib's
bootstrap over the design's base rows (95%, normal approximation): S ± conf.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from analysis.metrics import BASELINE, gain_table, run_accuracy, scheme_order
from analysis.runs import RunDirError
from sim.core.results import DESIGN_FILE, DESIGN_ROW

MEAN_GAIN, WORST_GAIN, MONEY = "mean gain", "worst-off gain", "money to target"
UNITS = {MEAN_GAIN: "points", WORST_GAIN: "points", MONEY: "money"}
RESAMPLES = 1000  # bootstrap resamples of the base rows: enough for the interval's second digit
LEVEL = 0.95
SMALL = 0.05  # a total index below this: the lever barely matters for that outcome
WIDE = 0.5  # an interval wider than half the variance says nothing about the lever: the design is too small for it
INDEX_COLUMNS = ["scheme", "outcome", "lever", "S1", "S1_low", "S1_high", "ST", "ST_low", "ST_high", "points",
                 "outcome_low", "outcome_high", "note"]


def gain_of(institution: str) -> str:
    """The outcome name of one institution's gain."""
    return f"gain of {institution}"


def read_design(directory: Path) -> dict:
    """A sensitivity sweep's ``design.json``; RunDirError (one line) when the directory is not one."""
    path = Path(directory) / DESIGN_FILE
    if not path.is_file():
        raise RunDirError(f"{directory}: no {DESIGN_FILE}, so not a sensitivity sweep; make one with "
                          "python -m sim.sweep sweep=sensitivity (sweep.search: sobol)")
    try:
        design = json.loads(path.read_text())
        levers = [lever["key"] for lever in design["levers"]]
        base, points = int(design["base"]), int(design["points"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path}: unreadable design ({type(e).__name__}: {e})") from None
    if design.get("method") != "sobol" or points != base * (len(levers) + 2):
        raise RunDirError(f"{path}: not a Sobol' design of N x (levers + 2) points")
    return design


def outcomes(trials: pd.DataFrame, metrics: pd.DataFrame, ledger: pd.DataFrame, institutions: pd.DataFrame,
             configs: dict, target: float | None = None) -> pd.DataFrame:
    """One row per scheme x design row x outcome: the outcome's mean over seeds (long table: ``value``).

    ``trials`` maps run_id to scheme, design_row and seed; gains need each design point's isolated run.
    """
    from analysis import costs

    runs = trials.dropna(subset=["run_id"])[["run_id", "scheme", DESIGN_ROW, "seed"]]
    gains = gain_table(metrics)
    per_inst = gains[["run_id", "institution", "gain"]].merge(runs, on="run_id")
    rows = [per_inst.assign(outcome=per_inst["institution"].map(gain_of))[["scheme", DESIGN_ROW, "seed", "outcome", "gain"]]]
    per_run = per_inst.groupby(["scheme", DESIGN_ROW, "seed"])["gain"]
    rows += [per_run.mean().reset_index().assign(outcome=MEAN_GAIN), per_run.min().reset_index().assign(outcome=WORST_GAIN)]
    own = metrics.assign(scenario=metrics["run_id"])  # each run its own scenario: its own target by default
    priced = costs.priced_ledger(ledger, institutions, costs.run_prices(configs))
    if len(priced):
        goal = costs.targets(run_accuracy(own), target)
        spent = costs.time_to_target(own, ledger, priced, goal)[["run_id", "cost_to_target"]].merge(runs, on="run_id")
        rows.append(spent.rename(columns={"cost_to_target": "gain"}).assign(outcome=MONEY))
    table = pd.concat(rows, ignore_index=True).rename(columns={"gain": "value"})
    # A design point's outcome is the mean over its seeds; a seed without a value leaves a gap (NaN), not a smaller mean.
    return (table.groupby(["scheme", "outcome", DESIGN_ROW], sort=False)["value"]
            .agg(lambda v: v.mean() if v.notna().all() else np.nan).reset_index())


def indices(design: dict, table: pd.DataFrame, *, resamples: int = RESAMPLES, level: float = LEVEL,
            seed: int = 0) -> pd.DataFrame:
    """First-order and total Sobol' indices with intervals per scheme x outcome x lever (``INDEX_COLUMNS``).

    ``table``: scheme, outcome, design_row, value (one value per design row). An outcome with
    missing rows or no variance gets NaN indices and a note saying why.
    """
    try:
        from SALib.analyze import sobol
    except ImportError:
        raise RunDirError("Sobol' indices need SALib: pip install 'collabsim[sensitivity]'") from None

    levers = [lever["key"] for lever in design["levers"]]
    points = int(design["points"])
    problem = {"num_vars": len(levers), "names": levers, "bounds": [[0.0, 1.0]] * len(levers)}
    rows = []
    for (scheme, outcome), g in table.groupby(["scheme", "outcome"], sort=False):
        y = g.set_index(DESIGN_ROW)["value"].reindex(range(points)).to_numpy(dtype=float)
        found = y[np.isfinite(y)]
        low, high = (float(found.min()), float(found.max())) if len(found) else (math.nan, math.nan)
        common = {"scheme": scheme, "outcome": outcome, "points": int(np.isfinite(y).sum()), "outcome_low": low,
                  "outcome_high": high}
        note = ""
        if len(found) < points:
            note = f"{points - len(found)} of {points} design points have no value (a failed trial, or a target not reached)"
        elif np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())):
            note = "the same value at every design point: no variance to apportion"
        if note:
            rows += [{**common, "lever": k, "note": note} for k in levers]
            continue
        # SALib seeds its bootstrap only with a truthy seed (0 would draw afresh each time): seed + 1 keeps it repeatable
        res = sobol.analyze(problem, y, calc_second_order=False, num_resamples=resamples, conf_level=level,
                            seed=seed + 1, print_to_console=False)
        for i, k in enumerate(levers):
            s1, c1, st, ct = (float(res[key][i]) for key in ("S1", "S1_conf", "ST", "ST_conf"))
            rows.append({**common, "lever": k, "S1": s1, "S1_low": s1 - c1, "S1_high": s1 + c1, "ST": st,
                         "ST_low": st - ct, "ST_high": st + ct, "note": ""})
    out = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    schemes = {s: i for i, s in enumerate(scheme_order(out["scheme"].unique()))}
    outcomes_first = {MEAN_GAIN: 0, WORST_GAIN: 1, MONEY: 2}  # then each institution's gain, in the scenario's order
    rank = lambda c: c.map(schemes) if c.name == "scheme" else c.map(outcomes_first).fillna(3)  # noqa: E731
    return out.sort_values(["scheme", "outcome"], key=rank, kind="stable").reset_index(drop=True)


def _pct(value: float) -> str:
    """A share as a whole percent, held to 0-100%: an estimate outside it is a small design's noise (the table keeps it)."""
    return f"{100 * min(1.0, max(0.0, value)):.0f}%"


def sentence(rows: pd.DataFrame) -> str:
    """One sentence on one scheme x outcome: which levers drive it, by how much, and how surely."""
    first = rows.iloc[0]
    what = f"Under {first['scheme']}, the {first['outcome']}"
    unit = "points" if first["outcome"] != MONEY else ""
    if first["note"]:
        return f"{what}: no indices ({first['note']})."
    spread = f" (from {first['outcome_low']:+.1f} to {first['outcome_high']:+.1f} {unit} over the design)" if unit else ""
    resolved = rows[rows.apply(_resolved, axis=1)]
    unsure = rows[~rows["lever"].isin(resolved["lever"])]
    small = resolved[resolved["ST_high"] < SMALL]
    drivers = resolved[resolved["ST_high"] >= SMALL].sort_values("ST", ascending=False)
    negligible = (f"{_and(small['lever'])} {'explains' if len(small) == 1 else 'each explain'} under {_pct(SMALL)}"
                  if len(small) else "")
    if drivers.empty and len(unsure):
        widest = unsure.assign(w=unsure["ST_high"] - unsure["ST_low"]).sort_values("w").iloc[-1]
        return (f"{what}{spread}: the design is too small to tell what drives it: {_and(unsure['lever'])} cannot be "
                f"told (an interval wider than {_pct(WIDE)} of the variance or an estimate outside 0 to 1; "
                f"{widest['lever']}'s total index reads {widest['ST']:.2f} [{widest['ST_low']:.2f}, "
                f"{widest['ST_high']:.2f}])" + (f"; {negligible}" if negligible else "") + "; raise sweep.num_samples.")
    if drivers.empty:
        return f"{what}{spread}: no lever explains as much as {_pct(SMALL)} of its variance."
    if len(unsure):  # "depends most on" would rank a resolved lever above levers the design cannot tell
        told = ", ".join(f"{r['lever']} explains {_pct(r['ST'])} in total (95% interval {_pct(r['ST_low'])} to "
                         f"{_pct(r['ST_high'])})" for _, r in drivers.iterrows())
        return (f"{what}{spread}: {_and(unsure['lever'])} cannot be told at this design size (raise sweep.num_samples); "
                f"of the others, {told}" + (f"; {negligible}" if negligible else "") + ".")
    top = drivers.iloc[0]
    said = (f"{what}{spread} depends most on {top['lever']}: alone it explains {_pct(top['S1'])} of the variance "
            f"(95% interval {_pct(top['S1_low'])} to {_pct(top['S1_high'])}), with its interactions "
            f"{_pct(top['ST'])} ({_pct(top['ST_low'])} to {_pct(top['ST_high'])})")
    said += "" if top["ST_low"] > 0 else ", though at this design size that cannot be told from no effect"
    matter = drivers.iloc[1:]
    if len(matter):
        said += "; " + ", ".join(f"{r['lever']} {_pct(r['ST'])} in total" for _, r in matter.iterrows())
    said += f"; {negligible}" if negligible else ""
    if 1.0 - float(rows["S1"].clip(lower=0).sum()) > 0.2:
        said += f"; about {_pct(1.0 - float(rows['S1'].clip(lower=0).sum()))} comes from levers acting together"
    return said + "."


def _resolved(row: pd.Series) -> bool:
    """Whether a lever's total index is estimated at all: inside [0, 1] give or take, with an interval narrower than WIDE."""
    return -0.1 <= row["ST"] <= 1.1 and row["ST_high"] - row["ST_low"] <= WIDE


def _and(names: Iterable[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def sentences(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(scheme, outcome, sentence) for every scheme x outcome of an indices table, in its order."""
    return [(s, o, sentence(g)) for (s, o), g in table.groupby(["scheme", "outcome"], sort=False)]


def text(table: pd.DataFrame, design: dict) -> str:
    """What ``python -m analysis sensitivity`` prints: the design, then per scheme the indices and a sentence per outcome."""
    levers = ", ".join(f"{lv['key']} [{lv['low']:g}, {lv['high']:g}]" for lv in design["levers"])
    lines = [f"Sobol' indices, {design['points']} design points (N = {design['base']}) over {len(design['levers'])} "
             f"levers: {levers}; S1 first order, ST total, [95% bootstrap interval]", ""]
    for scheme, g in table.groupby("scheme", sort=False):
        lines.append(f"{scheme}:")
        shown = g.assign(S1=[_cell(r, "S1") for _, r in g.iterrows()], ST=[_cell(r, "ST") for _, r in g.iterrows()])
        lines.append(shown[["outcome", "lever", "S1", "ST"]].to_string(index=False))
        lines += [f"  - {s}" for _, _, s in sentences(g)] + [""]
    return "\n".join(lines)


def _cell(row: pd.Series, column: str) -> str:
    if pd.isna(row[column]):
        return "-"
    return f"{row[column]:.2f} [{row[f'{column}_low']:.2f}, {row[f'{column}_high']:.2f}]"


def analyse(directory: Path, target: float | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read a sensitivity sweep: (design, outcomes per design row, per-run gains per institution, indices)."""
    from analysis.runs import load_results

    design = read_design(directory)
    trials_path = Path(directory) / "trials.parquet"
    if not trials_path.is_file():
        raise RunDirError(f"{directory}: no trials.parquet; has the sweep finished? (resume=true continues it)")
    trials = pd.read_parquet(trials_path)
    results = load_results([directory])
    table = outcomes(trials, results.metrics, results.ledger, results.institutions, results.configs, target)
    gains = gain_table(results.metrics).merge(trials[["run_id", DESIGN_ROW, *[lv["key"] for lv in design["levers"]]]],
                                              on="run_id")
    levels = table[table["scheme"] != BASELINE].merge(
        trials.drop_duplicates(DESIGN_ROW)[[DESIGN_ROW, *[lv["key"] for lv in design["levers"]]]], on=DESIGN_ROW)
    # isolated's gains are 0 by definition; its money to target is a question of its own
    kept = table[(table["scheme"] != BASELINE) | (table["outcome"] == MONEY)]
    return design, levels, gains, indices(design, kept, seed=int(design.get("seed", 0)))


def write(directory: Path, out: Path, target: float | None = None) -> str:
    """Analyse a sensitivity sweep, write ``indices.csv``/``.parquet`` and a collaboration map per lever pair into
    ``out``, and return the text ``python -m analysis sensitivity`` prints."""
    from analysis import maps
    from analysis.plots import png_bytes
    from sim.core.results import write_table, write_text

    design, levels, gains, table = analyse(directory, target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "indices.parquet")
    write_text(table.to_csv(index=False), out / "indices.csv")
    levers = {lv["key"]: lv for lv in design["levers"]}
    drawn = []
    for x, y in maps.pairs(list(levers), table):
        path = out / f"map_{x}__{y}.png"
        path.write_bytes(png_bytes(maps.collaboration_map(levels, gains, levers[x], levers[y], int(design["points"]))))
        drawn.append(path.name)
    return text(table, design) + f"tables: {out / 'indices.csv'}\ncollaboration maps: {out} ({', '.join(drawn)})"


def section(directory: Path, target: float | None = None) -> tuple[str, pd.DataFrame, set]:
    """The report's section on one sensitivity sweep: (HTML, its indices table, the run ids of its design points)."""
    import html

    from analysis import maps
    from analysis.page import image, section as titled
    from analysis.plots import png_bytes

    design, levels, gains, table = analyse(directory, target)
    levers = {lv["key"]: lv for lv in design["levers"]}
    ranges = "; ".join(f"{k} from {lv['low']:g} to {lv['high']:g} ({lv['kind']})" for k, lv in levers.items())
    crossed = ", ".join(f"{k} ({', '.join(map(str, v))})" for k, v in (design.get("crossed") or {}).items())
    body = (f"<p>A Sobol' design (Saltelli's scheme, SALib) of {design['points']} points (N = {design['base']} base "
            f"points x ({len(levers)} levers + 2)) over: {html.escape(ranges)}. Every point ran under each of "
            f"{html.escape(crossed or 'one configuration')} on seed(s) {', '.join(map(str, design.get('seeds', [])))}. "
            "S1, the first-order index, is the share of an outcome's variance over the design that a lever explains "
            "alone; ST, the total index, alone and through its interactions with the others. Whiskers: 95% bootstrap "
            "intervals; a design too small for an outcome shows as long whiskers (estimates outside 0 to 1 are drawn "
            "at the edge). Money to target: until the run's mean accuracy first reaches "
            + ("the target" if target is not None else "95% of what the run ends with") + ".</p>")
    for scheme, g in table.groupby("scheme", sort=False):
        body += f"<h3>{html.escape(scheme)}</h3>"
        body += image(png_bytes(maps.index_figure(g)), f"Sobol' indices under {scheme}",
                      "Blue: first order (alone); orange: total (with interactions).")
        body += "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for _, _, s in sentences(g)) + "</ul>"
    body += ("<h3>Collaboration maps</h3><p>Each map bins the design points of two levers into cells; a cell's colour "
             "is the mean over the points in it (the other levers vary within it over their ranges). Left: each "
             "scheme's mean gain over going alone (blue: gains, red: losses); right: the share of institutions worse off "
             "than alone. The black line is where collaboration stops paying (mean gain = 0); no line means it pays, or "
             "does not, everywhere on the map. Blank cells hold no design point.</p>")
    for x, y in maps.pairs(list(levers), table):
        body += image(png_bytes(maps.collaboration_map(levels, gains, levers[x], levers[y], int(design["points"]))),
                      f"Collaboration map over {x} and {y}", f"{x} against {y}.")
    runs = set(pd.read_parquet(Path(directory) / "trials.parquet")["run_id"].dropna())
    return (titled("sensitivity", "What drives who gains", body,
                   "Which levers move each outcome, and how much: Sobol' indices of a sensitivity sweep "
                   f"({html.escape(str(directory))})."), table, runs)


def is_design(directory: Path) -> bool:
    """Whether a directory given to the report is a sensitivity sweep (it holds design.json)."""
    return (Path(directory) / DESIGN_FILE).is_file()
