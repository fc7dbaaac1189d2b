"""How sure a figure is: intervals that respect what is possible, and one rule for stating a result as fact.

Every interval the report, the terminal and the findings show comes from :func:`bounded_interval`:
a 95% Student-t interval of a mean over seeds, shown only when there are :data:`MIN_SEEDS`
seeds or more *and* it stays inside the range the mean can take (an accuracy lies in [0, 1]; a
mean gain in points lies in [-100 x the baseline's accuracy, 100 x (1 - the baseline's accuracy)]).
Otherwise its bounds are NaN and :func:`bounded_interval`'s note says why, so a blank is never
unexplained.

Every sentence uses :func:`significance`: a gain or a loss is stated as a fact only when its
interval excludes zero; otherwise it is counted ("2 of 6 worse off, none significantly").
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

MIN_SEEDS = 3
"""Fewest seeds an interval is shown for: from two seeds a t-interval is too wide to mean anything."""
TOO_FEW = f"too few seeds (n < {MIN_SEEDS})"
"""Why an interval is blank: fewer than MIN_SEEDS seeds."""
TOO_UNCERTAIN = "too uncertain: the 95% interval leaves the possible range"
"""Why an interval is blank: the t-interval reaches values the figure cannot take."""


def bounded_interval(values: Iterable[float], lowest: float = -np.inf, highest: float = np.inf, level: float = 0.95,
                     min_n: int = MIN_SEEDS) -> tuple[float, float, float, str]:
    """Mean, the t-interval's bounds and a note: ``''`` when shown, else :data:`TOO_FEW` or :data:`TOO_UNCERTAIN`.

    ``lowest``/``highest`` is the range the mean can take; an interval reaching past it is
    not shown (its bounds are NaN), since a t-interval that leaves the possible range says
    more about the method than about the data.
    """
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return np.nan, np.nan, np.nan, "no values"
    mean = float(x.mean())
    if len(x) < max(2, min_n):
        return mean, np.nan, np.nan, TOO_FEW
    from scipy import stats  # when an interval is asked for: scipy.stats takes a second to import, a run's summary needs none

    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    low, high = mean - half, mean + half
    slack = 1e-9 * max(1.0, abs(lowest) if np.isfinite(lowest) else 1.0, abs(highest) if np.isfinite(highest) else 1.0)
    if low < lowest - slack or high > highest + slack:
        return mean, np.nan, np.nan, TOO_UNCERTAIN
    return mean, low, high, ""


def gain_range(baseline_accuracy: float) -> tuple[float, float]:
    """The range a mean gain in points can take against a baseline of this mean accuracy (a fraction)."""
    if pd.isna(baseline_accuracy):
        return -np.inf, np.inf
    return -100 * baseline_accuracy, 100 * (1 - baseline_accuracy)


def significance(low, high) -> int:
    """+1 when the interval lies above zero, -1 when below, 0 when it includes zero or there is none."""
    if pd.isna(low) or pd.isna(high):
        return 0
    return 1 if low > 0 else -1 if high < 0 else 0


def why_blank(note) -> str:
    """The note as a reason to print where an interval would be ('' when there is an interval)."""
    return "" if note is None or note is pd.NA or (isinstance(note, float) and np.isnan(note)) else str(note)


def sureness(low, high, note="") -> str:
    """A short qualifier for one figure: 'significant', 'not significant: its 95% interval includes zero', or why
    there is no interval."""
    if pd.notna(low) and pd.notna(high):
        return "significant" if significance(low, high) else "not significant: its 95% interval includes zero"
    reason = why_blank(note)
    return f"not established: {reason}" if reason else "not established: no interval"


def tally(signs: Iterable[int], total: int, verb: str, verb_one: str | None = None, subject: str = "institutions") -> str:
    """'k of n institutions are worse off, j significantly': a count, then how many of them are sure.

    ``signs`` holds :func:`significance` of each institution counted (all of one direction);
    'significantly' counts those whose interval excludes zero, so 'none significantly' says
    the whole count may be noise.
    """
    signs = list(signs)
    k, sure = len(signs), sum(1 for s in signs if s != 0)
    one = verb_one or verb + "s"
    if k == 0:
        return f"none of the {total} {subject} {one}" if total != 1 else f"no {subject.rstrip('s')} {one}"
    who = f"all {total} {subject} {verb}" if k == total and total > 1 else (
        f"the only {subject.rstrip('s')} {one}" if total == 1 else f"{k} of {total} {subject} {one if k == 1 else verb}")
    if sure == 0:
        return who + (", not significantly" if k == 1 else ", none significantly")
    return who + (", significantly" if k == 1 else f", {sure} significantly")
