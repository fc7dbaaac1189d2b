"""Charts of a sensitivity sweep: Sobol' indices per outcome, and collaboration maps over two levers.

A **collaboration map** bins the design points of two levers into a grid of cells; each
cell shows, per scheme, the mean gain over the design points that fall in it (the other
levers vary inside the cell, over their whole ranges, as in the design), and beside it the
share of institutions worse off than alone (institution x seed x point). The black line is
the "collaboration pays" frontier: the gain = 0 contour of the binned mean gain, where the
mean institution stops gaining. Cells with no design point stay blank.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from analysis.metrics import BASELINE, scheme_order
from analysis.plots import _style
from analysis.sensitivity import MEAN_GAIN

S1_COLOUR, ST_COLOUR = "#4c72b0", "#dd8452"
MAX_MAPS = 6  # with more levers, the pairs of the levers with the largest total indices for the mean gain


def index_figure(rows: pd.DataFrame, columns: int = 3) -> Figure:
    """One scheme's indices: a panel per outcome, bars of S1 and ST per lever with their 95% intervals."""
    outcomes = list(dict.fromkeys(rows["outcome"]))
    levers = list(dict.fromkeys(rows["lever"]))
    cols = min(columns, len(outcomes))
    lines = math.ceil(len(outcomes) / cols)
    fig = Figure(figsize=(3.4 * cols + 1.2, (0.42 * len(levers) + 1.1) * lines + 0.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(lines, cols, squeeze=False, sharex=True)
    y = np.arange(len(levers))
    for ax, outcome in zip(axes.flat, outcomes):
        g = rows[rows["outcome"] == outcome].set_index("lever").reindex(levers)
        _style(ax)
        ax.grid(axis="y", visible=False)
        ax.grid(axis="x", color="#e3e3e3", linewidth=0.8)
        for shift, column, colour, label in ((-0.18, "S1", S1_COLOUR, "first order S1 (alone)"),
                                             (0.18, "ST", ST_COLOUR, "total ST (with interactions)")):
            # estimates and intervals outside 0 to 1 (a small design's noise) are drawn to the edge, whiskers from the bar
            value, low, high = (np.clip(g[c].to_numpy(dtype=float), 0, 1.05) for c in (column, f"{column}_low", f"{column}_high"))
            err = np.clip(np.vstack([value - low, high - value]), 0, None)
            ax.barh(y + shift, np.clip(value, 0, 1), 0.34, color=colour, label=label)
            ax.errorbar(value, y + shift, xerr=err, fmt="none", ecolor="#333333", elinewidth=0.9, capsize=2)
        ax.set_yticks(y, levers, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.05)
        ax.set_title(outcome if not g["note"].fillna("").str.len().any() else f"{outcome}: no indices", loc="left",
                     fontsize=9.5)
    for ax in list(axes.flat)[len(outcomes):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("share of the variance", fontsize=8.5)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower left", frameon=False, fontsize=8.5, ncols=2)
    return fig


def pairs(levers: list[str], indices: pd.DataFrame) -> list[tuple[str, str]]:
    """The lever pairs to map: all of them, or with many levers those of the levers that matter most (mean gain's ST)."""
    every = list(itertools.combinations(levers, 2))
    if len(every) <= MAX_MAPS:
        return every
    weight = indices[indices["outcome"] == MEAN_GAIN].groupby("lever")["ST"].max().reindex(levers).fillna(0)
    return sorted(every, key=lambda p: -(weight[p[0]] + weight[p[1]]))[:MAX_MAPS]


def bins(points: int) -> int:
    """Cells per axis: about three design points per cell, 3 to 6 per axis."""
    return int(min(6, max(3, math.floor(math.sqrt(points / 3)))))


def binned(frame: pd.DataFrame, x: str, y: str, value: str, edges: tuple[np.ndarray, np.ndarray], how: str = "mean") -> np.ndarray:
    """The mean (or share of negatives) of ``value`` in each cell of the grid ``edges``; NaN where no point falls."""
    ix = np.clip(np.searchsorted(edges[0], frame[x], side="right") - 1, 0, len(edges[0]) - 2)
    iy = np.clip(np.searchsorted(edges[1], frame[y], side="right") - 1, 0, len(edges[1]) - 2)
    cells = frame.assign(_x=ix, _y=iy).groupby(["_y", "_x"])[value]
    agg = cells.mean() if how == "mean" else cells.apply(lambda v: float((v < 0).mean()))
    grid = np.full((len(edges[1]) - 1, len(edges[0]) - 1), np.nan)
    for (j, i), v in agg.items():
        grid[j, i] = v
    return grid


def collaboration_map(levels: pd.DataFrame, gains: pd.DataFrame, x: dict, y: dict, points: int) -> Figure:
    """Per scheme, mean gain (left) and share of institutions worse off (right) over levers ``x`` and ``y``.

    ``levels``: scheme, outcome, design_row, value and the levers' columns (analysis.sensitivity.analyse);
    ``gains``: per run x institution ``gain`` with design_row and the levers' columns. ``x``, ``y``: design.json levers.
    """
    schemes = [s for s in scheme_order(levels["scheme"].unique()) if s != BASELINE]
    k = bins(points)
    edges = tuple(np.geomspace(lv["low"], lv["high"], k + 1) if lv["kind"] == "loguniform"
                  else np.linspace(lv["low"], lv["high"], k + 1) for lv in (x, y))
    fig = Figure(figsize=(8.6, 3.2 * len(schemes) + 0.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(schemes), 2, squeeze=False)
    mean = levels[levels["outcome"] == MEAN_GAIN]
    grids = {s: binned(mean[mean["scheme"] == s], x["key"], y["key"], "value", edges) for s in schemes}
    reach = max(1e-9, max((np.nanmax(np.abs(g)) for g in grids.values() if np.isfinite(g).any()), default=1.0))
    norm = TwoSlopeNorm(0.0, -reach, reach)
    centres = [(e[:-1] + e[1:]) / 2 for e in edges]
    for row, scheme in zip(axes, schemes):
        worse = binned(gains[gains["scheme"] == scheme], x["key"], y["key"], "gain", edges, how="share")
        for ax, grid, cmap, kw, label in ((row[0], grids[scheme], "RdBu", {"norm": norm}, "mean gain (points)"),
                                          (row[1], worse, "Reds", {"vmin": 0, "vmax": 1}, "share worse off")):
            _style(ax)
            ax.grid(False)
            mesh = ax.pcolormesh(edges[0], edges[1], np.ma.masked_invalid(grid), cmap=cmap, **kw)
            fig.colorbar(mesh, ax=ax, label=label, shrink=0.9)
            paid = np.ma.masked_invalid(grids[scheme])
            if paid.count() >= 4 and paid.min() < 0 < paid.max():
                ax.contour(centres[0], centres[1], paid, levels=[0.0], colors="black", linewidths=1.8)
            ax.set_xlabel(x["key"])
            ax.set_ylabel(y["key"])
            if x["kind"] == "loguniform":
                ax.set_xscale("log")
            if y["kind"] == "loguniform":
                ax.set_yscale("log")
        row[0].set_title(f"{scheme}: mean gain over alone", loc="left", fontsize=10)
        row[1].set_title(f"{scheme}: share of institutions worse off", loc="left", fontsize=10)
    return fig
