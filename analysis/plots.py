"""Plots of results tables, drawn with matplotlib's object API on the Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: no global backend
switch, no figure registry to leak memory in a long sweep, nothing ever shown. Every
function takes tables from :mod:`analysis.metrics` and returns a Figure; ``png_bytes``
renders one. Each scheme keeps its colour across all plots.
"""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from analysis.metrics import BASELINE, POOLED, scheme_order

FIXED = {BASELINE: "#7f7f7f", POOLED: "#222222"}
PALETTE = [colormaps["tab10"](i) for i in (0, 1, 2, 4, 6, 8, 9, 3, 5)]
WORSE = "#c0392b"


def scheme_colors(schemes: Iterable[str]) -> dict[str, object]:
    """A stable colour per scheme: grey for isolated, near-black for pooled, tab10 for the rest in name order."""
    rest = [s for s in scheme_order(schemes) if s not in FIXED]
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(rest)}
    return {**colours, **{s: c for s, c in FIXED.items() if s in set(schemes)}}


def _figure(width: float = 8.0, height: float = 4.2) -> tuple[Figure, object]:
    """A figure with one axes in the house look: light grid, no top/right spines."""
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    _style(ax)
    return fig, ax


def _style(ax) -> None:
    """Light horizontal grid behind the data; no top and right frame lines."""
    ax.grid(axis="y", color="#e3e3e3", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def accuracy_plot(curve: pd.DataFrame, title: str = "Accuracy per round") -> Figure:
    """Lines of mean accuracy per round for each scheme, with a band from the worst to the best seed."""
    fig, ax = _figure()
    colours = scheme_colors(curve["scheme"])
    for scheme in scheme_order(curve["scheme"]):
        c = curve[curve["scheme"] == scheme].sort_values("round")
        label = scheme if c["source"].iloc[0] == "global model" else f"{scheme} (mean of institutions)"
        style = "--" if scheme == BASELINE else "-"
        ax.plot(c["round"], c["mean"], style, color=colours[scheme], label=label, linewidth=2)
        if (c["runs"] > 1).any():
            ax.fill_between(c["round"], c["low"], c["high"], color=colours[scheme], alpha=0.15, linewidth=0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Round (0 = before training)")
    ax.set_ylabel("Test accuracy")
    ax.set_title(title, loc="left", fontsize=12)
    ax.legend(frameon=False, fontsize=9, loc="lower right")
    return fig


def gain_plot(gains: pd.DataFrame, title: str = "Gain over training alone") -> Figure:
    """Grouped bars of each institution's mean gain per scheme, with 95% interval error bars; losses outlined red.

    Institutions appear in the order of the table (sort it to choose the order).
    """
    schemes = scheme_order(gains["scheme"])
    institutions = list(dict.fromkeys(gains["institution"]))
    fig, ax = _figure(width=min(14.0, max(8.0, 0.22 * len(institutions) * len(schemes) + 2)))
    colours = scheme_colors(schemes)
    width = 0.8 / max(1, len(schemes))
    x = np.arange(len(institutions))
    for k, scheme in enumerate(schemes):
        g = gains[gains["scheme"] == scheme].set_index("institution").reindex(institutions)
        pos = x - 0.4 + width * (k + 0.5)
        lower = (g["gain"] - g["gain_low"]).to_numpy()
        upper = (g["gain_high"] - g["gain"]).to_numpy()
        bars = ax.bar(pos, g["gain"], width * 0.92, color=colours[scheme], label=scheme)
        for bar, worse in zip(bars, g["worse_off"].fillna(False).astype(bool)):
            if worse:
                bar.set_edgecolor(WORSE)
                bar.set_linewidth(1.8)
        if np.isfinite(lower).any():
            ax.errorbar(pos, g["gain"], yerr=np.vstack([lower, upper]), fmt="none", ecolor="#333333", elinewidth=1, capsize=3)
    ax.axhline(0, color="#555555", linewidth=1)
    ax.set_xticks(x, [i.replace("_", " ") for i in institutions], rotation=20, ha="right")
    ax.set_ylabel("Gain (accuracy points)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.0f}" if v else "0"))
    ax.set_title(title, loc="left", fontsize=12)
    handles = [Patch(color=colours[s], label=s) for s in schemes]  # plain swatches: bars may carry a red outline
    handles.append(Patch(facecolor="white", edgecolor=WORSE, linewidth=1.8, label="worse off than alone"))
    ax.legend(handles=handles, frameon=False, fontsize=9, ncols=min(len(handles), 6), loc="upper left", bbox_to_anchor=(0, -0.25))
    return fig


def pareto_plot(costs: pd.DataFrame, title: str = "Accuracy against communication") -> Figure:
    """Mean accuracy against megabytes exchanged per scheme; schemes on the Pareto front filled and joined."""
    fig, ax = _figure()
    colours = scheme_colors(costs["scheme"])
    for _, row in costs.iterrows():
        on_front = bool(row["pareto"])
        ax.scatter(row["megabytes"], row["mean_accuracy"], s=90 if on_front else 60, zorder=3,
                   color=colours[row["scheme"]] if on_front else "white", edgecolors=colours[row["scheme"]], linewidths=2)
        ax.annotate(row["scheme"], (row["megabytes"], row["mean_accuracy"]), textcoords="offset points",
                    xytext=(7, 5), fontsize=9)
    front = costs[costs["pareto"].astype(bool)].sort_values("megabytes")
    if len(front) > 1:
        ax.plot(front["megabytes"], front["mean_accuracy"], color="#999999", linewidth=1, drawstyle="steps-post", zorder=2)
    positive = costs["megabytes"][costs["megabytes"] > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.margins(x=0.15, y=0.15)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("Megabytes exchanged per run (up + down)")
    ax.set_ylabel("Mean institution accuracy")
    ax.set_title(title + " (filled = Pareto front)", loc="left", fontsize=12)
    return fig


def contribution_plot(contribution: pd.DataFrame, institutions: pd.DataFrame, gains: pd.DataFrame | None = None) -> Figure:
    """Side-by-side bars per institution: Shapley value (with its error), data share, and gain under the best scheme."""
    names = list(contribution["institution"])
    share = institutions.drop_duplicates("institution").set_index("institution")["share"].reindex(names)
    # Shapley values are in the value function's units (accuracy); shown in points like every gain.
    panels = [("Shapley value (points)", contribution["shapley"].to_numpy() * 100,
               contribution["shapley_bound"].to_numpy() * 100, "#4c72b0"),
              ("Data share", share.to_numpy() * 100, None, "#8c8c8c")]
    gains = None if gains is None else gains.dropna(subset=["gain"])
    if gains is not None and len(gains):  # no isolated baseline in the runs read: no gain panel
        best = gains.groupby("scheme")["gain"].mean().idxmax()
        g = gains[gains["scheme"] == best].set_index("institution")["gain"].reindex(names)
        panels.append((f"Gain under {best} (points)", g.to_numpy(), None, "#55a868"))
    fig = Figure(figsize=(3.0 * len(panels) + 1.6, 0.45 * len(names) + 1.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    y = np.arange(len(names))
    for ax, (label, values, err, colour) in zip(axes, panels):
        _style(ax)
        ax.grid(axis="y", visible=False)
        ax.grid(axis="x", color="#e3e3e3", linewidth=0.8)
        has_err = err is not None and np.nanmax(np.abs(err), initial=0) > 0
        ax.barh(y, values, color=colour, xerr=err if has_err else None, capsize=3)
        ax.axvline(0, color="#555555", linewidth=1)
        ax.set_title(label + (" (%)" if label == "Data share" else ""), fontsize=10, loc="left")
    axes[0].set_yticks(y, [n.replace("_", " ") for n in names])
    axes[0].invert_yaxis()
    return fig


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (no software metadata, so the image carries no links)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
