"""HTML building blocks of the report: number formats, column guide, tables, and the page shell.

Everything is inline (CSS in a <style> block, images as data URIs) so the page opens
without a network. Numbers are rounded for reading; the exported tables keep full precision.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.certainty import MIN_SEEDS, TOO_UNCERTAIN, why_blank

GLOBAL_TEST = "global test set"
"""The test data every merged model is scored on; always named with GLOBAL_TEST_IS nearby."""
GLOBAL_TEST_IS = "the union of every institution's test split"
OWN_TEST = "each institution's own test split"
"""The test data an institution's accuracy and gain are measured on."""
TOO_FEW_SEEDS = f"too few seeds for an interval (n < {MIN_SEEDS})"

# column -> (heading, what it means, format). Formats: text, pct (fraction as %), pts (signed
# accuracy points), pts_abs (unsigned points), loss (signed, 3 decimals), int, mb, sec, float, ratio,
# bool. Missing values show as a dash.
GUIDE: dict[str, tuple[str, str, str]] = {
    "scenario": ("Scenario", "Name of the collaboration scenario.", "text"),
    "scheme": ("Scheme", "How institutions collaborate, by its name in conf/scheme/: isolated = each trains alone (the "
               "baseline); pooled = all data brought to one place; any other = federated learning (data stays home, "
               "model updates travel).", "text"),
    "institution": ("Institution", "", "text"),
    "discipline": ("Discipline", "", "text"),
    "share": ("Data share", "Fraction of all training data this institution holds.", "pct"),
    "train_samples": ("Training samples", "", "int"),
    "test_samples": ("Test samples", "", "int"),
    "label_skew": ("Label skew (α)", "Dirichlet α of its mix of labels: smaller means more lopsided; — = no skew.", "float"),
    "feature_skew": ("Feature shift", "Size of a shift added to its inputs (0 = none).", "float"),
    "cpus": ("CPUs", "Processor cores allotted to it.", "float"),
    "gpus": ("GPUs", "", "float"),
    "behaviour": ("Behaviour", "honest, or a simulated misbehaviour (free-rider, noisy labels, ...).", "text"),
    "global_accuracy": ("Global accuracy", f"Accuracy on the {GLOBAL_TEST} ({GLOBAL_TEST_IS}) at the selected round: "
                        "the merged model's, or, for schemes without one merged model (isolated, personalised schemes), "
                        "the mean of every institution's own model on it.", "pct"),
    "mean_accuracy": ("Mean accuracy", f"Average over institutions of its accuracy at the selected round on {OWN_TEST}.", "pct"),
    "worst_accuracy": ("Worst accuracy", f"Lowest accuracy of any institution at the selected round, on {OWN_TEST}.", "pct"),
    "mean_gain": ("Mean gain", "Average over institutions of its accuracy minus what it reaches alone, in percentage points "
                  f"(on {OWN_TEST}).", "pts"),
    "mean_gain_interval": ("95% interval", f"t-interval of the mean gain over seeds; shown with {MIN_SEEDS} seeds or "
                           "more, and only when it stays within the gains possible (an accuracy lies between 0 and "
                           "100%): otherwise 'too uncertain'.", "text"),
    "mean_gain_note": ("Why no interval", "Empty when the interval is shown; else 'too few seeds' or 'too uncertain' "
                       "(the t-interval reaches gains no accuracy could give).", "text"),
    "worse_off": ("Worse off", "Number of institutions whose mean gain over seeds is below zero, sure or not.", "int"),
    "significantly_worse_off": ("Surely worse off", "Of those, how many have a 95% interval entirely below zero; "
                                "the others may be noise.", "int"),
    "megabytes": ("MB exchanged", "Megabytes sent and received in a whole run, all institutions together.", "mb"),
    "seeds": ("Seeds", "Number of repeated runs behind the figure.", "int"),
    "gain": ("Gain", f"Accuracy under the scheme minus accuracy alone, on {OWN_TEST}, in percentage points (mean over "
             "seeds).", "pts"),
    "loss_change": ("Loss change", f"Loss on {OWN_TEST} under the scheme minus loss alone (negative = better).", "loss"),
    "worst_institution": ("Worst off", "Institution with the smallest gain.", "text"),
    "worst_gain": ("Its gain", "Gain of the worst-off institution, in percentage points.", "pts"),
    "gain_std": ("Spread (SD)", "Standard deviation of gains across institutions, in points.", "pts_abs"),
    "gain_gini": ("Gini of gains", "0 = everyone gains the same; 1 = maximally uneven. Mean absolute difference of gains "
                  "divided by twice their mean absolute value, so it works for losses too.", "ratio"),
    "share_better_off": ("Better off", "Share of institutions that gain.", "pct"),
    "accuracy_parity": ("Discipline gap", "Mean accuracy of the best discipline minus the worst, in percentage points.", "pts_abs"),
    "worst_discipline": ("Lowest discipline", "Discipline with the lowest mean accuracy.", "text"),
    "runs": ("Runs", "Number of runs averaged.", "int"),
    "mb_up": ("MB up", "Megabytes sent to the coordinator.", "mb"),
    "mb_down": ("MB down", "Megabytes received from the coordinator.", "mb"),
    "mb_per_member_round": ("MB per member-round", "Megabytes one institution sends and receives in a round it takes "
                            "part in.", "mb"),
    "compute_seconds": ("Wall time (s), measured", "Wall-clock seconds local training took on the machine that ran "
                        "it, summed over institutions and rounds: changes with that machine's load, so not comparable "
                        "between runs (tables only).", "sec"),
    "sim_compute_seconds": ("Compute (simulated s)", "Simulated device seconds of training, summed over institutions "
                            "and rounds: samples processed x the model's work per sample at each institution's declared "
                            "CPUs and GPUs. The same on any machine, under any load.", "sec"),
    "simulated_seconds": ("Busy time (s)", "Simulated seconds of work and transfer, summed over institutions.", "sec"),
    "staleness": ("Staleness", "Asynchronous schemes: mean number of server steps between the model an update was trained "
                  "from and the one it was merged into (— for synchronous schemes).", "ratio"),
    "simulated_duration": ("Duration (s)", "Simulated length of the run: a synchronous round lasts as long as its slowest participant (at most the round deadline), an asynchronous one until the next arrival.", "sec"),
    "epsilon": ("Privacy ε", "Largest differential-privacy budget spent by any institution (— = no privacy noise).", "float"),
    "accuracy_per_mb": ("Accuracy per MB", "Mean accuracy divided by megabytes exchanged (— when nothing is exchanged).", "ratio"),
    "pareto": ("Pareto front", "Yes when no other scheme is both more accurate and cheaper to communicate.", "bool"),
    "honest_accuracy": ("Honest accuracy", f"Mean accuracy of the honest institutions on {OWN_TEST}, with the others "
                        "misbehaving.", "pct"),
    "misbehaving": ("Misbehaving", "Institutions per run that do not behave honestly.", "int"),
    "reference": ("Reference", "Scheme whose runs have every institution honest: what the honest ones reach when "
                  "nobody cheats.", "text"),
    "reference_accuracy": ("Reference accuracy", "The same honest institutions' mean accuracy under the reference, "
                           "same seeds.", "pct"),
    "kept": ("Kept", "Honest accuracy as a share of the reference accuracy (100% = no damage).", "pct"),
    "damage": ("Damage", "Honest accuracy minus reference accuracy, in percentage points.", "pts"),
    "backdoor_success": ("Backdoor success", "Share of the global test rows (not already of the target class) that "
                         "the merged model labels as the poisoner's target once the trigger is added: the attack's "
                         "success rate.", "pct"),
    "shapley": ("Shapley value", f"Average improvement of the merged model's accuracy on the {GLOBAL_TEST} when this "
                "institution joins, over all orders of joining, in percentage points.", "pts"),
    "shapley_bound": ("± bound", "Error bound of a Monte-Carlo estimate at 95% (0 = computed exactly).", "pts_abs"),
    "loo": ("Leave-one-out", f"Drop in the merged model's accuracy on the {GLOBAL_TEST} when only this institution stays "
            "out, in percentage points.", "pts"),
    "method": ("Method", "", "text"),
    "directory": ("Directory", "", "text"),
    "state": ("State", "From the directory's status.json, or, without one, what its files show; runs that did not "
              "complete are left out.", "text"),
    "included": ("Included", "", "bool"),
    "schemes": ("Schemes", "", "text"),
    "seed_values": ("Seed values", "", "text"),
}

POINT_SCALED = {"shapley", "shapley_bound", "loo", "accuracy_parity"}  # fractions shown as points


_GUIDE = GUIDE


def fmt(value, kind: str) -> str:
    """One value as text for reading: percentages to 1 decimal, points signed, megabytes to 3 figures."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "pct":
        return f"{value * 100:.1f}%"
    if kind == "pts":
        return "0.0" if round(value, 1) == 0 else f"{value:+.1f}".replace("-", "−")
    if kind == "loss":
        return "0.000" if round(value, 3) == 0 else f"{value:+.3f}".replace("-", "−")
    if kind == "pts_abs":
        return f"{value:.1f}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "mb":  # never in e-notation: a few bytes read as '< 0.001'
        return "0" if value == 0 else f"{value:,.1f}" if value >= 100 else "< 0.001" if value < 0.001 else f"{value:.3g}"
    if kind == "sec":
        return f"{value:,.1f}"
    if kind in ("float", "ratio"):  # three significant figures, never in e-notation (0.00000381, 12,300)
        return f"{value:,.0f}" if abs(value) >= 1000 else np.format_float_positional(
            float(value), precision=3, unique=False, fractional=False, trim="-")
    if kind == "bool":
        return "yes" if bool(value) else "no"
    return str(value)


def behaviour_guide(columns: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """Guide entries for the ``gain_<behaviour>`` columns of the damage table."""
    return {c: (f"Gain of {c[5:].replace('_', ' ')}", f"Mean gain over training alone of the institutions that behave "
                f"as {c[5:]}, in percentage points, on {OWN_TEST}.", "pts") for c in columns if c.startswith("gain_")}


def table(df: pd.DataFrame, columns: Sequence[str], *, row_class: Sequence[str] | None = None, guide: bool = True,
          extra: dict[str, tuple[str, str, str]] | None = None) -> str:
    """An HTML table of ``columns`` with explained headings, and a short guide to the columns below it.

    ``extra`` explains columns the fixed GUIDE cannot know (one per behaviour, say).
    """
    GUIDE = {**_GUIDE, **(extra or {})}  # noqa: N806 - the module's guide, widened for this table only
    numeric = {c for c in columns if GUIDE.get(c, ("", "", "text"))[2] not in ("text", "bool")}
    num = {c: ' class="num"' if c in numeric else "" for c in columns}
    head = "".join(
        f'<th{num[c]} title="{html.escape(GUIDE.get(c, (c, "", ""))[1])}">{html.escape(GUIDE.get(c, (c,))[0])}</th>'
        for c in columns
    )
    rows = []
    for i, (_, r) in enumerate(df.iterrows()):
        cls = f' class="{row_class[i]}"' if row_class is not None and row_class[i] else ""
        cells = "".join(
            f"<td{num[c]}>{html.escape(fmt(_scaled(c, r[c]), GUIDE.get(c, ('', '', 'text'))[2]))}</td>"
            for c in columns
        )
        rows.append(f"<tr{cls}>{cells}</tr>")
    out = f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
    explained = [(GUIDE[c][0], GUIDE[c][1]) for c in columns if c in GUIDE and GUIDE[c][1]]
    if guide and explained:
        items = "".join(f"<dt>{html.escape(h)}</dt><dd>{html.escape(d)}</dd>" for h, d in explained)
        out += f'<dl class="guide">{items}</dl>'
    return out


def interval_note(seeds) -> str:
    """One sentence for a table whose rows have ``seeds`` seeds each: '' when every row has an interval."""
    seeds = pd.Series(seeds, dtype="float64").dropna()
    if seeds.empty or (seeds >= MIN_SEEDS).all():
        return ""
    if (seeds < MIN_SEEDS).all():
        return f"No intervals: {TOO_FEW_SEEDS}; small differences may be noise."
    return f"Intervals only where there are {MIN_SEEDS} seeds or more; elsewhere {TOO_FEW_SEEDS}."


def interval_text(low, high, note=None) -> str:
    """'low to high' in signed points; without an interval, why not (``note``, e.g. 'too uncertain: ...'), or ''."""
    if pd.notna(low) and pd.notna(high):
        return f"{fmt(low, 'pts')} to {fmt(high, 'pts')}"
    return why_blank(note)


def short_reason(note) -> str:
    """The first words of a note on a missing interval ('too uncertain', 'too few seeds (n < 3)'), for a cell."""
    return why_blank(note).split(":")[0]


def gain_matrix(gains: pd.DataFrame) -> str:
    """Institutions down, schemes across: each cell the mean gain in points over its 95% interval (if any); losses in red."""
    schemes = list(dict.fromkeys(gains["scheme"]))
    head = "<th>Institution</th><th>Discipline</th>" + "".join(f'<th class="num">{html.escape(s)}</th>' for s in schemes)
    rows = []
    for institution, g in gains.groupby("institution", sort=False):
        by = g.set_index("scheme")
        cells = [f"<td>{html.escape(institution)}</td><td>{html.escape(str(g['discipline'].iloc[0]))}</td>"]
        for s in schemes:
            if s not in by.index:
                cells.append('<td class="cell">—</td>')
                continue
            r = by.loc[s]
            interval = interval_text(r["gain_low"], r["gain_high"])
            if not interval and r.get("gain_note") == TOO_UNCERTAIN:
                interval = short_reason(r["gain_note"])
            small = f"<br><small>{html.escape(interval)}</small>" if interval else ""
            loss = " loss" if r["worse_off"] else ""
            cells.append(f'<td class="cell{loss}">{html.escape(fmt(r["gain"], "pts"))}{small}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _scaled(column: str, value):
    """Values kept as fractions in the tables but read as accuracy points."""
    if column in POINT_SCALED and isinstance(value, (int, float)) and not pd.isna(value):
        return value * 100
    return value


def image(png: bytes, alt: str, caption: str = "") -> str:
    """A figure with the PNG embedded as a data URI, and an optional caption."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">{cap}</figure>'


def section(anchor: str, title: str, body: str, intro: str = "") -> str:
    """A titled section with an optional introductory sentence."""
    lead = f'<p class="lead">{html.escape(intro)}</p>' if intro else ""
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{lead}{body}</section>'


CSS = """
:root { --ink:#1f2933; --muted:#5f6b7a; --line:#d9dee5; --accent:#1f5f99; --soft:#f4f7fa; --bad:#b03a2e; }
* { box-sizing:border-box; }
body { margin:0; background:#eef1f4; color:var(--ink);
  font:15px/1.55 -apple-system, "Segoe UI", "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width:1080px; margin:0 auto; background:#fff; padding:40px 56px 56px; min-height:100vh; }
header { border-bottom:3px solid var(--accent); padding-bottom:14px; margin-bottom:24px; }
h1 { font-size:28px; margin:0 0 4px; letter-spacing:-0.01em; }
h2 { font-size:20px; margin:40px 0 8px; padding-bottom:4px; border-bottom:1px solid var(--line); }
.sub { color:var(--muted); margin:0; }
nav { font-size:13px; color:var(--muted); margin:-8px 0 20px; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; }
.findings { background:var(--soft); border-left:4px solid var(--accent); padding:14px 20px; margin:0 0 8px; }
.findings h2 { margin:0 0 6px; border:0; font-size:18px; }
.findings ul { margin:6px 0 2px; padding-left:20px; } .findings li { margin:4px 0; font-size:15.5px; }
.warning { background:#fdf1ee; border-left:4px solid var(--bad); padding:10px 16px; margin:12px 0; }
.lead { color:var(--muted); margin:0 0 12px; }
.note { font-size:12.5px; color:var(--muted); margin:4px 0 14px; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:13.5px; margin:8px 0 6px; }
th, td { padding:6px 9px; border-bottom:1px solid var(--line); text-align:left; white-space:nowrap; }
th { background:var(--soft); font-weight:600; border-bottom:2px solid var(--line); cursor:help;
  white-space:normal; vertical-align:bottom; line-height:1.25; }
td.cell { text-align:right; line-height:1.25; } td.cell small { color:var(--muted); font-size:11.5px; }
td.cell.loss { background:#fbe9e6; color:var(--bad); } td.cell.loss small { color:var(--bad); }
.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.loss td { background:#fbe9e6; } tr.loss td:first-child { box-shadow:inset 3px 0 var(--bad); }
tr.excluded td { color:var(--muted); text-decoration:line-through; }
dl.guide { display:grid; grid-template-columns:max-content 1fr; gap:2px 14px; font-size:12.5px;
  color:var(--muted); margin:6px 0 14px; }
dl.guide dt { font-weight:600; } dl.guide dd { margin:0; }
figure { margin:14px 0; } figure img { max-width:100%; height:auto; display:block; }
figcaption { font-size:12.5px; color:var(--muted); margin-top:4px; }
footer { margin-top:40px; padding-top:10px; border-top:1px solid var(--line); font-size:12.5px; color:var(--muted); }
code { background:var(--soft); padding:1px 4px; border-radius:3px; font-size:13px; }
@media print { body { background:#fff; } main { padding:0; } }
"""


def page(title: str, body: str) -> str:
    """The whole HTML document: inline CSS, no scripts, no external resources."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")
