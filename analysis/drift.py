"""How much of FedAvg's loss is client drift and how much is the scenario, institution by institution.

For each seed and institution (accuracy on its own test split, at the selected round), FedAvg's gain over
training alone splits exactly into three gaps, in accuracy points:

    FedAvg - alone  =  (pooled - alone)  -  (corrector - FedAvg)  -  (pooled - corrector)
                        scenario            drift                     rest

- **scenario**: what pooling every institution's data gives over going alone: what the heterogeneity and sizes of
  the partners allow at best, whatever the scheme;
- **drift**: what a drift-correcting scheme (SCAFFOLD, else FedSGD, whose one gradient step per round cannot
  drift) recovers over FedAvg with the same data: the share of FedAvg's loss due to client drift;
- **rest**: what federation still leaves below pooling once drift is corrected.

:func:`sections` puts this table in the report, after the settings a tuned compare chose for each scheme (what
the gaps depend on).

Each gap is a mean over seeds with a 95% interval (:func:`analysis.certainty.bounded_interval`, kept within the
range a difference of accuracies can take) and is stated as a fact only when its interval excludes zero.
"""

from __future__ import annotations

import html

import pandas as pd

from analysis.certainty import bounded_interval, gain_range, significance
from analysis.metrics import POOLED
from analysis.page import fmt, interval_note, interval_text, section, short_reason, table

FEDAVG = "fedavg"
CORRECTORS = ("scaffold", "fedsgd")
"""Drift-correcting schemes, in order of preference: the first one the runs hold is FedAvg's yardstick."""
TERMS = ("fedavg_gain", "scenario_gap", "drift_gap", "rest_gap")
COLUMNS = ["scenario", "institution", "discipline", "corrector", "seeds",
           *[f"{t}{s}" for t in TERMS for s in ("", "_low", "_high", "_note")]]


def drift_table(gains_per_run: pd.DataFrame) -> pd.DataFrame:
    """One row per scenario x institution: FedAvg's gain and its three gaps (scenario, drift, rest) with intervals.

    ``gains_per_run`` is :func:`analysis.metrics.gain_table`. Empty for a scenario without FedAvg, pooled and a
    drift-correcting scheme (:data:`CORRECTORS`) run on the same seeds.
    """
    rows = []
    for scenario, g in gains_per_run.groupby("scenario", sort=False):
        held = set(g["scheme"])
        corrector = next((c for c in CORRECTORS if c in held), None)
        if FEDAVG not in held or POOLED not in held or corrector is None:
            continue
        acc = g.pivot_table(index=["seed", "institution"], columns="scheme", values="accuracy", aggfunc="mean")
        alone = g.groupby(["seed", "institution"])["isolated_accuracy"].first()  # one baseline, on every scheme's row
        acc = acc[[FEDAVG, POOLED, corrector]].assign(alone=alone).dropna()
        discipline = g.drop_duplicates("institution").set_index("institution")["discipline"]
        for institution in dict.fromkeys(g["institution"]):  # scenario order
            if institution not in acc.index.get_level_values("institution"):
                continue
            a = acc.xs(institution, level="institution")
            gaps = {"fedavg_gain": (a[FEDAVG], a["alone"]), "scenario_gap": (a[POOLED], a["alone"]),
                    "drift_gap": (a[corrector], a[FEDAVG]), "rest_gap": (a[POOLED], a[corrector])}
            row = {"scenario": scenario, "institution": institution, "discipline": discipline.get(institution),
                   "corrector": corrector, "seeds": len(a)}
            for term, (minuend, base) in gaps.items():  # in points, as analysis.metrics.gain_table computes a gain
                mean, low, high, note = bounded_interval((minuend - base) * 100, *gain_range(base.mean()))
                row |= {term: mean, f"{term}_low": low, f"{term}_high": high, f"{term}_note": note}
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _said(row: pd.Series, term: str) -> str:
    """'+31.6 points (95% interval +20.1 to +43.0)', or with the short reason there is no interval."""
    if pd.notna(row[f"{term}_low"]) and pd.notna(row[f"{term}_high"]):
        inside = f"95% interval {interval_text(row[f'{term}_low'], row[f'{term}_high'])}"
    else:
        inside = short_reason(row[f"{term}_note"]) or "no interval"
    return f"{fmt(row[term], 'pts')} points ({inside})"


def _sign(row: pd.Series, term: str) -> int:
    """+1 / -1 when the gap's interval lies above / below zero, else 0 (the certainty rule)."""
    return significance(row[f"{term}_low"], row[f"{term}_high"])


def institution_sentence(row: pd.Series) -> str:
    """What FedAvg's result for one institution is made of, each part stated as fact only when significant."""
    c = row["corrector"]
    drift = (f"{c} recovers {_said(row, 'drift_gap')}: client drift" if _sign(row, "drift_gap") > 0 else
             f"{c} changes it by {_said(row, 'drift_gap')}: no drift established")
    s = _sign(row, "scenario_gap")
    scenario = (f"pooled data is {_said(row, 'scenario_gap')} against alone: the scenario" if s < 0 else
                f"pooled data gains {_said(row, 'scenario_gap')}: the scenario allows a gain" if s > 0 else
                f"pooled data changes it by {_said(row, 'scenario_gap')}: no effect of the scenario established")
    return f"{row['institution']}, {_said(row, 'fedavg_gain')} under FedAvg: {drift}; {scenario}"


def drift_findings(table: pd.DataFrame) -> list[tuple[str, str]]:
    """One finding: for every institution FedAvg leaves worse off than alone, how much is drift and how much scenario."""
    if table.empty:
        return []
    worse = table[table["fedavg_gain"] < 0]
    c = table["corrector"].iloc[0]
    if worse.empty:
        return [("Drift or scenario", f"FedAvg leaves no institution worse off than alone; {c} is the drift-correcting "
                 "yardstick, and the drift table gives every institution's gaps.")]
    drifted = int(sum(_sign(r, "drift_gap") > 0 for _, r in worse.iterrows()))
    scenario = int(sum(_sign(r, "scenario_gap") < 0 for _, r in worse.iterrows()))
    sure = int(sum(_sign(r, "fedavg_gain") < 0 for _, r in worse.iterrows()))
    head = (f"FedAvg leaves {len(worse)} of {len(table)} institutions below training alone ({sure} significantly); "
            f"for {drifted} of them {c} recovers a significant part of the loss (client drift), and for {scenario} even "
            "pooling all data is significantly below alone (the scenario).")
    return [("Drift or scenario", head + " " + " ".join(institution_sentence(r) + "." for _, r in worse.iterrows()))]


GUIDE = {
    "corrector": ("Drift corrector", "The drift-correcting scheme FedAvg is compared with (SCAFFOLD, else FedSGD).", "text"),
    "fedavg_gain": ("FedAvg gain", "FedAvg's accuracy minus training alone, in points: scenario − drift − rest.", "pts"),
    "scenario_gap": ("Scenario", "Pooled data minus training alone: what the partners' data allow at best.", "pts"),
    "drift_gap": ("Drift", "Drift corrector minus FedAvg: the part of FedAvg's result lost to client drift.", "pts"),
    "rest_gap": ("Rest", "Pooled minus drift corrector: what federation still leaves once drift is corrected.", "pts"),
}
"""Column headings and meanings for the report's drift table (analysis.page.table's ``extra``)."""

TUNED_GUIDE = {
    "trials": ("Trials", "Ray Tune trials of the scheme's own settings: the same number for every scheme.", "int"),
    "chosen_trial": ("Chosen trial", "0 = the scheme's config settings; any other, a draw from its search space.", "int"),
    "settings": ("Chosen settings", "The settings every seed of the compare ran the scheme with.", "text"),
    "val_score": ("Validation accuracy", "Mean over institutions of validation accuracy at the selected round, with "
                  "the chosen settings on the tuning seed.", "pct"),
    "config_val_score": ("At config settings", "The same with the scheme's config settings.", "pct"),
    "chosen_on": ("Chosen on", "Which data chose the settings: always validation, never test.", "text"),
}
"""Column headings of the report's tuned-settings table."""


def sections(pick: dict[str, pd.DataFrame], tag: str, suffix: str) -> str:
    """The report's 'Tuned settings' (a tuned compare) and 'Drift or scenario' sections ('' for what the runs lack)."""
    out = ""
    if len(pick["tuned"]):
        out += section(f"tuned{tag}", "Tuned settings" + suffix,
                       table(pick["tuned"], ["scheme", "trials", "chosen_trial", "settings", "val_score",
                                             "config_val_score", "chosen_on"], extra=TUNED_GUIDE),
                       "Each scheme's settings after the same budget of Ray Tune trials on the compare's first seed; "
                       "the validation accuracy chose them, never the test data (tuning.csv has every trial).")
    if len(pick["drift"]):
        note = ("FedAvg gain = scenario − drift − rest, seed by seed, in accuracy points on each institution's own test "
                "split; intervals are in tables/drift.csv. " + interval_note(pick["drift"]["seeds"]))
        out += section(f"drift{tag}", "Drift or scenario" + suffix,
                       table(pick["drift"], ["institution", "corrector", "fedavg_gain", "scenario_gap", "drift_gap",
                                             "rest_gap"], extra=GUIDE) + f'<p class="note">{html.escape(note.strip())}</p>',
                       "How much of FedAvg's result is client drift (what a drift-correcting scheme recovers) and how "
                       "much is the scenario (what pooling all data gives over going alone).")
    return out
