"""A Markdown results page for the docs site from a compare's run directory: ``python -m analysis page DIR``.

The page holds what a reader of the docs needs to trust the numbers: the date and the command, whether the schemes
were tuned (and to what, chosen on validation data), the summary by scheme with intervals, the key findings in
words (the report's own sentences), the drift decomposition, and, given the untuned compare of the same scenario
(``--untuned DIR``), each scheme's gain before and after tuning and how far its gap to pooled data closes.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis import drift
from analysis import findings as words
from analysis import metrics as m
from analysis.page import fmt, interval_text, short_reason
from analysis.runs import load_results


def _table(df: pd.DataFrame, columns: dict[str, str]) -> str:
    """A Markdown table of ``columns`` (column -> heading); cells already text."""
    head = "| " + " | ".join(columns.values()) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    return head + "".join("| " + " | ".join(str(r[c]) for c in columns) + " |\n" for _, r in df.iterrows())


def _iv(low, high, note) -> str:
    """'−2.8 to +5.8', or the short reason there is no interval ('too uncertain', 'too few seeds (n < 3)')."""
    return interval_text(low, high) if pd.notna(low) and pd.notna(high) else short_reason(note) or "—"


def _interval(row: pd.Series) -> str:
    """A summary row's interval cell."""
    return "0 (baseline)" if row["scheme"] == m.BASELINE else _iv(row["mean_gain_low"], row["mean_gain_high"],
                                                                  row.get("mean_gain_note"))


def closing(tuned: pd.DataFrame, untuned: pd.DataFrame) -> pd.DataFrame:
    """Per scheme: mean gain untuned and tuned, gap to pooled (mean accuracy points) in each, and the share closed."""
    rows = []
    pooled = {name: t.set_index("scheme")["mean_accuracy"].get(m.POOLED) for name, t in (("u", untuned), ("t", tuned))}
    for scheme in tuned["scheme"]:
        if scheme not in set(untuned["scheme"]) or scheme in (m.POOLED, m.BASELINE):
            continue
        u, t = untuned.set_index("scheme").loc[scheme], tuned.set_index("scheme").loc[scheme]
        gap_u, gap_t = (pooled["u"] - u["mean_accuracy"]) * 100, (pooled["t"] - t["mean_accuracy"]) * 100
        closed = (gap_u - gap_t) / gap_u if gap_u > 0 else float("nan")
        shown = ("—" if pd.isna(closed) else f"{closed:.0%}" if closed >= 0.005 else "none" if closed > -0.005
                 else f"none ({-closed:.0%} wider)")
        rows.append({"scheme": scheme, "gain_untuned": fmt(u["mean_gain"], "pts"), "gain_tuned": fmt(t["mean_gain"], "pts"),
                     "gap_untuned": fmt(gap_u, "pts_abs"), "gap_tuned": fmt(gap_t, "pts_abs"),
                     "closed": shown})
    return pd.DataFrame(rows)


def results_page(run_dir: Path, command: str, untuned: Path | None = None, note: str | None = None) -> str:
    """The Markdown page of one compare (and, with ``untuned``, the same compare's untuned run beside it)."""
    from analysis.report import analyse

    results = load_results([run_dir])
    tables = analyse(results)
    summary, gains = tables["summary"], m.order_rows(tables["gains"])
    configs = list(results.configs.values())
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = [f"Generated {when} by `python -m analysis page` from the run of:", "", "```bash", command, "```", ""]
    out += [note, ""] if note else []
    out += ["## Were the schemes tuned?", ""]
    out += [text[:1].upper() + text[1:] for _, text in words.tuning_findings(results.tuned, configs)] + [""]
    if len(results.tuned):
        shown = results.tuned.assign(val=lambda d: d["val_score"].map(lambda v: fmt(v, "pct")),
                                     own=lambda d: d["config_val_score"].map(lambda v: fmt(v, "pct")),
                                     kept=lambda d: d["chosen_trial"].map(lambda k: "yes" if k == 0 else "no"))
        out += [_table(shown, {"scheme": "Scheme", "trials": "Trials", "settings": "Chosen settings",
                               "val": "Validation acc. (chosen)", "own": "Validation acc. (config settings)",
                               "kept": "Config settings kept"}), ""]
    out += ["## Summary by scheme", "", "Means over seeds; gains in accuracy points over training alone, on each "
            "institution's own test split; 95% t-intervals over seeds. " + words.selection_rule(configs), ""]
    rows = summary.assign(**{c: summary[c].map(lambda v: fmt(v, "pct")) for c in ("mean_accuracy", "worst_accuracy")},
                          gain=summary["mean_gain"].map(lambda v: fmt(v, "pts")),
                          interval=summary.apply(_interval, axis=1), mb=summary["megabytes"].map(lambda v: fmt(v, "mb")))
    out += [_table(rows, {"scheme": "Scheme", "seeds": "Seeds", "mean_accuracy": "Mean accuracy",
                          "worst_accuracy": "Worst accuracy", "gain": "Mean gain", "interval": "95% interval",
                          "worse_off": "Worse off", "significantly_worse_off": "Surely worse off", "mb": "MB"}), ""]
    if untuned is not None:
        before = analyse(load_results([untuned]))["summary"]
        closed = closing(summary, before)
        if len(closed):
            out += ["## Tuning against the config settings", "",
                    "The same compare at every scheme's config settings beside the tuned one: mean gain "
                    "over training alone, and the gap in mean accuracy to pooled data (each compare's own pooled row), "
                    "with the share of that gap tuning closed.", "",
                    _table(closed, {"scheme": "Scheme", "gain_untuned": "Gain, config settings", "gain_tuned": "Gain, tuned",
                                    "gap_untuned": "Gap to pooled, config", "gap_tuned": "Gap to pooled, tuned",
                                    "closed": "Gap closed"}), ""]
    said = (words.findings(summary, gains, tables["fairness"], tables["costs"]) + drift.drift_findings(tables["drift"]))
    out += ["## Key findings", "", *[f"- **{topic}:** {text}" for topic, text in said], ""]
    if len(tables["drift"]):
        d = tables["drift"].assign(**{t: tables["drift"].apply(
            lambda r, t=t: f"{fmt(r[t], 'pts')} ({_iv(r[t + '_low'], r[t + '_high'], r[t + '_note'])})",
            axis=1) for t in drift.TERMS})
        out += ["## Drift or scenario", "", "FedAvg's gain = scenario − drift − rest, seed by seed (points; 95% "
                "interval in brackets): scenario = pooled − alone, drift = " + d["corrector"].iloc[0] + " − FedAvg, "
                "rest = pooled − " + d["corrector"].iloc[0] + ".", "",
                _table(d, {"institution": "Institution", "fedavg_gain": "FedAvg gain", "scenario_gap": "Scenario",
                           "drift_gap": "Drift", "rest_gap": "Rest"}), ""]
    out += ["## Gain per institution", "", _table(gains.assign(
        gain_text=gains["gain"].map(lambda v: fmt(v, "pts")),
        interval=gains.apply(lambda r: _iv(r["gain_low"], r["gain_high"], r["gain_note"]), axis=1)),
        {"scheme": "Scheme", "institution": "Institution", "gain_text": "Gain", "interval": "95% interval"}), ""]
    return "\n".join(out)


BEGIN, END = "<!-- measured: begin -->", "<!-- measured: end -->"
"""The generated block of a page, as docs/results/make_page.py marks it: the prose around it is the author's."""


def write_page(path: Path, body: str, title: str) -> None:
    """Put ``body`` between the page's measured markers (the prose around them stays), or start the page."""
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = f"# {title}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
