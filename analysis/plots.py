"""Plots of results tables, drawn with matplotlib's object API on the Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: no global backend
switch, no figure registry to leak memory in a long sweep, nothing ever shown. Every
function takes tables from :mod:`analysis.metrics` and returns a Figure; ``png_bytes``
renders one. Each scheme keeps its colour, line style and marker across all plots, so
two schemes differ in more than colour; every plot names the test set it shows.

Nothing may hide anything else: lines of several schemes are drawn a few points apart
at each round (dodged), markers that would land on one another in the Pareto plot are
set side by side, and labels go where they overlap no marker and no other label.
"""

from __future__ import annotations

import io
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib import figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator, PercentFormatter
from matplotlib.transforms import Bbox, ScaledTranslation

from analysis.metrics import BASELINE, POOLED, scheme_order
from analysis.page import GLOBAL_TEST, GLOBAL_TEST_IS, GUIDE, OWN_TEST

PALETTE = [colormaps["tab10"](i) for i in (0, 1, 2, 4, 6, 8, 9, 3, 5)]
LINESTYLES = ["-", (0, (6, 2)), "-.", (0, (1, 1.5)), (0, (8, 2, 2, 2)), (0, (3, 1, 1, 1, 1, 1))]
MARKERS = ["^", "D", "v", "P", "X", "<", ">", "h", "*"]
WORSE = "#c0392b"
DODGE = 4.0  # points between neighbouring schemes at one round: equal curves stay side by side


class Figure(figure.Figure):
    """A matplotlib Figure that Jupyter shows as a PNG by itself (``_repr_png_``), with no pyplot and no backend."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self)


class SchemeStyle(NamedTuple):
    """How one scheme is drawn in every plot."""

    colour: object
    linestyle: object
    marker: str


FIXED = {BASELINE: SchemeStyle("#7f7f7f", (0, (4, 2)), "o"), POOLED: SchemeStyle("#222222", "-", "s")}


def scheme_styles(schemes: Iterable[str]) -> dict[str, SchemeStyle]:
    """A stable style per scheme: grey circles for isolated, black squares for pooled, the rest in name order."""
    schemes = scheme_order(schemes)
    rest = [s for s in schemes if s not in FIXED]
    styles = {s: SchemeStyle(PALETTE[i % len(PALETTE)], LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)])
              for i, s in enumerate(rest)}
    return {s: FIXED.get(s) or styles[s] for s in schemes}


def scheme_colors(schemes: Iterable[str]) -> dict[str, object]:
    """The colour of each scheme's style."""
    return {s: style.colour for s, style in scheme_styles(schemes).items()}


def _style(ax) -> None:
    """Light horizontal grid behind the data; no top and right frame lines."""
    ax.grid(axis="y", color="#e3e3e3", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _percent_axis(axis) -> None:
    """Fractions shown as whole percents on ticks at whole-percent steps (no 2.5% step rounded to '78%')."""
    axis.set_major_locator(MaxNLocator(nbins=7, steps=[1, 2, 5, 10]))
    axis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _figure(width: float = 8.0, height: float = 4.2) -> tuple[Figure, object]:
    """A figure with one axes in the house look, on an Agg canvas (so text can be measured before saving)."""
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _style(ax)
    return fig, ax


def accuracy_plot(curve: pd.DataFrame, own: pd.DataFrame | None = None, title: str = "Accuracy per round") -> Figure:
    """Accuracy per round and scheme on the global test set and, given ``own``, on each institution's own test split.

    ``curve`` and ``own`` are :func:`analysis.metrics.round_curve` tables (mean, low, high
    over runs). Rows of ``curve`` that are not a score on the global test set (``source``
    other than "global model") are left out of that panel and named under it. Whiskers
    span the lowest to the highest seed.
    """
    panels = [(curve, "global_accuracy", f"On the {GLOBAL_TEST}\n({GLOBAL_TEST_IS})")]
    if own is not None and len(own):
        panels.append((own, "mean_accuracy", f"On {OWN_TEST}\n(mean over institutions)"))
    schemes = scheme_order(pd.concat([p[0]["scheme"] for p in panels]))
    styles, n = scheme_styles(schemes), len(schemes)
    fig = Figure(figsize=(4.6 * len(panels) + 0.8, 4.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for panel, (ax, (table, column, heading)) in enumerate(zip(axes, panels)):
        _style(ax)
        missing = []
        if panel == 0 and "source" in table:
            missing = scheme_order(table.loc[table["source"] != "global model", "scheme"])
            table = table[table["source"] == "global model"]
        rounds = np.sort(table["round"].unique())
        step = max(1, int(np.ceil(len(rounds) / 12)))  # markers on about 12 rounds at most
        for k, scheme in enumerate(schemes):
            c = table[table["scheme"] == scheme].sort_values("round")
            if c.empty:
                continue
            st = styles[scheme]
            moved = ax.transData + ScaledTranslation((k - (n - 1) / 2) * DODGE / 72, 0, fig.dpi_scale_trans)
            marks = [i for i in range(len(c)) if (i + k) % step == 0]  # schemes mark different rounds when sparse
            ax.plot(c["round"], c["mean"], linestyle=st.linestyle, color=st.colour, transform=moved, label=scheme,
                    linewidth=3.0 - 1.6 * k / max(1, n - 1), marker=st.marker, markevery=marks, markersize=6.5,
                    markeredgecolor="white", markeredgewidth=0.8, zorder=3 + k)
            # A shifted transform is not data to autoscaling: the limits are taken from the values themselves.
            ax.update_datalim(np.column_stack([np.tile(c["round"], 3), np.concatenate([c["mean"], c["low"], c["high"]])]))
            m = c.iloc[marks]
            if (m["runs"] > 1).any():
                spread = np.clip(np.vstack([m["mean"] - m["low"], m["high"] - m["mean"]]), 0, None)
                ax.errorbar(m["round"], m["mean"], yerr=spread, fmt="none", ecolor=st.colour, elinewidth=1, capsize=2, alpha=0.7, transform=moved, zorder=2)
        ax.autoscale_view()
        ax.set_title(heading, loc="left", fontsize=10)
        ax.set_ylabel(GUIDE[column][0])
        ax.set_xlabel("Round (0 = before training)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _percent_axis(ax.yaxis)
        ax.tick_params(axis="y", labelleft=True)
        if missing:
            ax.text(0.01, 0.01, f"not scored on this test set: {', '.join(missing)}", transform=ax.transAxes,
                    fontsize=8, color="#5f6b7a", va="bottom")
    fig.suptitle(title, x=0.01, ha="left", fontsize=12)
    handles = [Line2D([], [], color=styles[s].colour, linestyle=styles[s].linestyle, marker=styles[s].marker,
                      linewidth=2, markersize=6.5, markeredgecolor="white", label=s) for s in schemes]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(n, 6), frameon=False, fontsize=9)
    return fig


def gain_plot(gains: pd.DataFrame, title: str = "Gain over training alone") -> Figure:
    """Grouped bars of each institution's mean gain per scheme, with 95% interval whiskers where there is one.

    Gains are measured on each institution's own test split. Losses are outlined red;
    institutions appear in the order of the table (sort it to choose the order).
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
        lower = (g["gain"] - g["gain_low"]).to_numpy(dtype=float)
        upper = (g["gain_high"] - g["gain"]).to_numpy(dtype=float)
        bars = ax.bar(pos, g["gain"], width * 0.92, color=colours[scheme], label=scheme)
        for bar, worse in zip(bars, g["worse_off"].fillna(False).astype(bool)):
            if worse:
                bar.set_edgecolor(WORSE)
                bar.set_linewidth(1.8)
        if np.isfinite(lower).any():
            ax.errorbar(pos, g["gain"], yerr=np.clip(np.vstack([lower, upper]), 0, None), fmt="none", ecolor="#333333", elinewidth=1, capsize=3)
    ax.axhline(0, color="#555555", linewidth=1)
    ax.set_xticks(x, institutions, rotation=20, ha="right")
    ax.set_ylabel(f"{GUIDE['gain'][0]} (accuracy points)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.0f}" if v else "0"))
    ax.set_title(f"{title}, on {OWN_TEST}", loc="left", fontsize=12)
    handles = [Patch(color=colours[s], label=s) for s in schemes]  # plain swatches: bars may carry a red outline
    handles.append(Patch(facecolor="white", edgecolor=WORSE, linewidth=1.8, label="worse off than alone"))
    ax.legend(handles=handles, frameon=False, fontsize=9, ncols=min(len(handles), 6), loc="upper left", bbox_to_anchor=(0, -0.25))
    return fig


def pareto_plot(costs: pd.DataFrame, title: str = "Mean accuracy against MB exchanged", *, x: str = "megabytes",
                xlabel: str | None = None, front: str = "pareto") -> Figure:
    """Mean accuracy (own test splits) against a cost per scheme (``x``: megabytes, or money); the Pareto front filled and joined.

    Markers closer than their own width are set side by side (the values stay in the
    table), and each label takes the first free place around its marker.
    """
    fig, ax = _figure()
    costs = costs.dropna(subset=[x, "mean_accuracy"])
    styles = scheme_styles(costs["scheme"])
    on = costs[front].astype(bool).to_numpy()
    steps = costs[on].sort_values(x)
    if len(steps) > 1:
        ax.plot(steps[x], steps["mean_accuracy"], color="#999999", linewidth=1, drawstyle="steps-post", zorder=2)
    positive = costs[x][costs[x] > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.scatter(costs[x], costs["mean_accuracy"], s=0)  # sets the limits before markers are placed
    ax.margins(x=0.18, y=0.22)
    _percent_axis(ax.yaxis)
    ax.set_xlabel(xlabel or f"{GUIDE['megabytes'][0]} per run (up + down, all institutions)")
    ax.set_ylabel(f"{GUIDE['mean_accuracy'][0]} (own test splits)")
    ax.set_title(f"{title}\n(accuracy on {OWN_TEST}; filled = Pareto front)", loc="left", fontsize=11)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # freeze the layout: placements below are in pixels of this one
    size = 9.5 * 1.3 * fig.dpi / 72  # marker width in pixels (s=90 is 9.5 points across; a diamond reaches further)
    points = ax.transData.transform(costs[[x, "mean_accuracy"]].to_numpy(dtype=float))
    shifts = side_by_side(points, size)
    placed: list[Bbox] = [Bbox.from_bounds(px + dx - size / 2, y - size / 2, size, size) for (px, y), dx in zip(points, shifts)]
    corners = ax.transData.transform(steps[[x, "mean_accuracy"]].to_numpy(dtype=float))
    for (x0, y0), (x1, y1) in zip(corners[:-1], corners[1:]):  # the front's steps: across, then up or down
        placed += [Bbox.from_extents(x0, y0 - 2, x1, y0 + 2), Bbox.from_extents(x1 - 2, min(y0, y1), x1 + 2, max(y0, y1))]
    renderer = fig.canvas.get_renderer()
    for (_, row), (px, y), dx, on_front in zip(costs.iterrows(), points, shifts, on):
        st = styles[row["scheme"]]
        moved = ax.transData + ScaledTranslation(dx / fig.dpi, 0, fig.dpi_scale_trans)
        ax.scatter(row[x], row["mean_accuracy"], s=90, marker=st.marker, zorder=3, transform=moved,
                   color=st.colour if on_front else "white", edgecolors=st.colour, linewidths=2)
        text = ax.text(0, 0, row["scheme"], fontsize=9)
        extent = text.get_window_extent(renderer)
        text.remove()
        box = label_place((px + dx, y), extent.width, extent.height, size / 2 + 4, placed, ax.get_window_extent())
        placed.append(box)
        offset = ((box.x0 - px) * 72 / fig.dpi, (box.y0 - y) * 72 / fig.dpi)
        far = np.hypot(box.x0 + box.width / 2 - px - dx, box.y0 + box.height / 2 - y) > 3 * size
        ax.annotate(row["scheme"], (row[x], row["mean_accuracy"]), xytext=offset, textcoords="offset points",
                    fontsize=9, ha="left", va="bottom", annotation_clip=False, color=_ink(st.colour),
                    arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.8} if far else None)
    return fig


def _ink(colour) -> object:
    """A label colour matching its marker, darkened where the marker's grey would be too pale for text."""
    return "#555555" if colour == FIXED[BASELINE].colour else colour


def side_by_side(points: np.ndarray, gap: float) -> np.ndarray:
    """Horizontal pixel shifts that set points closer than ``gap`` side by side, centred on their group."""
    shifts = np.zeros(len(points))
    groups: list[list[int]] = []
    for i in np.lexsort((points[:, 1], points[:, 0])):  # left to right, deterministic
        near = [g for g in groups if any(np.hypot(*(points[i] - points[j])) < gap for j in g)]
        merged = [i] + [j for g in near for j in g]
        groups = [g for g in groups if g not in near] + [sorted(merged)]
    for g in groups:
        for k, i in enumerate(sorted(g, key=lambda j: (points[j, 0], -points[j, 1], j))):
            shifts[i] = (k - (len(g) - 1) / 2) * gap
    return shifts


def label_place(anchor: tuple[float, float], width: float, height: float, radius: float,
                taken: list[Bbox], inside: Bbox) -> Bbox:
    """Where a label of ``width`` x ``height`` pixels goes: the first spot around ``anchor`` that overlaps nothing taken.

    Spots are tried right, left, above, below and on the diagonals, at one, two and three
    times ``radius``; a spot must stay inside ``inside``. With no free spot the one that
    overlaps least is taken.
    """
    x, y = anchor
    spots = []
    for r in (radius, 2 * radius, 3 * radius):
        spots += [(x + r, y - height / 2), (x - r - width, y - height / 2), (x - width / 2, y + r),
                  (x - width / 2, y - r - height), (x + r * 0.7, y + r * 0.7), (x + r * 0.7, y - r * 0.7 - height),
                  (x - r * 0.7 - width, y + r * 0.7), (x - r * 0.7 - width, y - r * 0.7 - height)]
    best, best_cost = None, np.inf
    for x0, y0 in spots:
        box = Bbox.from_bounds(x0, y0, width, height)
        outside = not (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1)
        cost = sum(_overlap(box, t) for t in taken) + (width * height if outside else 0.0)
        if cost == 0:
            return box
        if cost < best_cost:
            best, best_cost = box, cost
    return best


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area two boxes share (0 when they only touch)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def contribution_plot(contribution: pd.DataFrame, institutions: pd.DataFrame, gains: pd.DataFrame | None = None) -> Figure:
    """Side-by-side bars per institution: Shapley value (with its error), data share, and gain under the best scheme.

    Shapley values score the merged model on the global test set; gains are on each
    institution's own test split; the panel titles say so.
    """
    names = list(contribution["institution"])
    share = institutions.drop_duplicates("institution").set_index("institution")["share"].reindex(names)
    # Shapley values are in the value function's units (accuracy); shown in points like every gain.
    panels = [(f"{GUIDE['shapley'][0]} (points)\non the global test set", contribution["shapley"].to_numpy() * 100,
               contribution["shapley_bound"].to_numpy() * 100, "#4c72b0"),
              (f"{GUIDE['share'][0]} (%)", share.to_numpy() * 100, None, "#8c8c8c")]
    gains = None if gains is None else gains.dropna(subset=["gain"])
    if gains is not None and len(gains):  # no isolated baseline in the runs read: no gain panel
        best = gains.groupby("scheme")["gain"].mean().idxmax()
        g = gains[gains["scheme"] == best].set_index("institution")["gain"].reindex(names)
        panels.append((f"{GUIDE['gain'][0]} under {best} (points)\non own test splits", g.to_numpy(), None, "#55a868"))
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
        ax.set_title(label, fontsize=10, loc="left")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    return fig


def privacy_plot(privacy: pd.DataFrame, title: str = "Mean accuracy against privacy budget ε") -> Figure:
    """Mean accuracy (own test splits) per scheme against epsilon, from :func:`analysis.trust.privacy_table`.

    Schemes with privacy noise are drawn at their epsilon (log scale; smaller is more
    private), joined when one scheme has several budgets; schemes that share updates
    without noise stand at "no guarantee" right of a break; isolated (nothing shared) is
    a dashed line. Whiskers: 95% interval over seeds where there are enough.
    """
    fig, ax = _figure()
    styles = scheme_styles(privacy["scheme"])
    private = privacy[privacy["epsilon"].notna()]
    loose = privacy[privacy["epsilon"].isna() & (privacy["scheme"] != BASELINE)]
    eps = private["epsilon"].to_numpy(dtype=float)
    lo, hi = float(eps.min()), float(eps.max())
    beyond = hi * max(4.0, (hi / lo) ** 0.35)  # where "no guarantee" stands, clear of the largest budget
    ax.set_xscale("log")
    for k, (scheme, g) in enumerate(pd.concat([private, loose.assign(epsilon=beyond)]).groupby("scheme", sort=False)):
        st = styles[scheme]
        g = g.sort_values("epsilon")
        ends = pd.concat([g["mean_accuracy"], g["mean_accuracy_low"], g["mean_accuracy_high"]]).dropna()
        ax.scatter(np.resize(g["epsilon"].to_numpy(), len(ends)), ends, s=0)  # shifted lines set no limits: their values do
        shift = ScaledTranslation((k - len(styles) / 2) * DODGE / 72, 0, fig.dpi_scale_trans)  # equal points stay apart
        ax.plot(g["epsilon"], g["mean_accuracy"], linestyle=st.linestyle if len(g) > 1 else "none", color=st.colour,
                marker=st.marker, markersize=8, markeredgecolor="white", label=scheme, zorder=3, transform=ax.transData + shift)
        spread = np.vstack([g["mean_accuracy"] - g["mean_accuracy_low"], g["mean_accuracy_high"] - g["mean_accuracy"]])
        if np.isfinite(spread).any():
            ax.errorbar(g["epsilon"], g["mean_accuracy"], yerr=np.clip(np.nan_to_num(spread), 0, None), fmt="none",
                        ecolor=st.colour, elinewidth=1, capsize=3, alpha=0.7, transform=ax.transData + shift)
    alone = privacy[privacy["scheme"] == BASELINE]
    if len(alone):
        ax.axhline(float(alone["mean_accuracy"].mean()), color=FIXED[BASELINE].colour, linestyle=(0, (4, 2)), linewidth=1.5,
                   label=f"{BASELINE} (shares nothing)")
    ticks = sorted(set(eps)) + ([beyond] if len(loose) else [])
    ax.set_xticks(ticks, [f"{e:g}" for e in sorted(set(eps))] + (["no\nguarantee"] if len(loose) else []))
    ax.xaxis.set_minor_locator(NullLocator())  # name only the budgets that were run
    if len(loose):
        ax.axvline(np.sqrt(hi * beyond), color="#bbbbbb", linewidth=1, linestyle=":")
    ax.set_xlim(lo / 2, (beyond if len(loose) else hi) * 2)
    _percent_axis(ax.yaxis)
    ax.set_xlabel("Privacy budget ε spent by the end of the run (log scale; smaller = more private)")
    ax.set_ylabel(f"{GUIDE['mean_accuracy'][0]} (own test splits)")
    ax.set_title(f"{title}\n(accuracy on {OWN_TEST}; whiskers: 95% interval over seeds)", loc="left", fontsize=11)
    ax.legend(frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (no software metadata, so the image carries no links)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
