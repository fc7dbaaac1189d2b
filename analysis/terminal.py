"""The summary as the terminal prints it after a compare: rounded, with every interval or the reason it is missing.

A blank interval is never printed as ``NaN``: the ``mean_gain_95%`` column holds the interval in
signed points, or why there is none ('too few seeds (n < 3)', 'too uncertain').
"""

from __future__ import annotations

import pandas as pd

from analysis.page import fmt, short_reason

INTERVAL = "mean_gain_95%"
"""The terminal's column for the mean gain's 95% interval (or why there is none)."""


def interval_cell(scheme: str, low, high, note, baseline: str) -> str:
    """'−1.2 to +3.4', '0 (baseline)', or the short reason the interval is missing."""
    if scheme == baseline:
        return "0 (baseline)"
    if pd.notna(low) and pd.notna(high):
        return f"{fmt(low, 'pts')} to {fmt(high, 'pts')}"
    return short_reason(note) or "—"


def summary_text(table: pd.DataFrame, baseline: str = "isolated") -> str:
    """The summary table as text: the low/high/note columns folded into one readable interval column."""
    shown = table.copy()
    notes = shown["mean_gain_note"] if "mean_gain_note" in shown else pd.Series("", index=shown.index)
    shown.insert(shown.columns.get_loc("mean_gain_low"), INTERVAL,
                 [interval_cell(s, lo, hi, n, baseline) for s, lo, hi, n in
                  zip(shown["scheme"], shown["mean_gain_low"], shown["mean_gain_high"], notes)])
    shown = shown.drop(columns=[c for c in ("mean_gain_low", "mean_gain_high", "mean_gain_note") if c in shown])
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")
