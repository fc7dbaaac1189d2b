"""Plots: each names its test set, schemes differ in more than colour, and nothing hides anything else."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from matplotlib.transforms import Bbox

from analysis import metrics as m
from analysis import plots
from conftest import demo_tables


def _costs(rows: list[tuple[str, float, float, bool]]) -> pd.DataFrame:
    """A cost table with the columns pareto_plot reads: scheme, megabytes, mean_accuracy, pareto."""
    return pd.DataFrame(rows, columns=["scheme", "megabytes", "mean_accuracy", "pareto"])


def _overlap(a: Bbox, b: Bbox) -> bool:
    """True when two boxes share some area (touching edges do not count)."""
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


def test_every_plot_names_its_test_set():
    metrics, ledger, inst = demo_tables(seeds=(0,), rounds=3)
    gains = m.gain_summary(m.gain_table(metrics))
    acc = plots.accuracy_plot(m.round_curve(metrics), m.round_curve(metrics[metrics["institution"] != m.GLOBAL]))
    left, right = acc.axes
    assert "global test set" in left.get_title(loc="left") and "union of every institution's test split" in left.get_title(loc="left")
    assert "own test split" in right.get_title(loc="left")
    assert "own test split" in plots.gain_plot(gains).axes[0].get_title(loc="left")
    pareto = plots.pareto_plot(m.cost_table(metrics, ledger)).axes[0]
    assert "own test split" in pareto.get_title(loc="left") and "own test splits" in pareto.get_ylabel()
    contribution = pd.DataFrame({"institution": ["city_hospital", "rural_clinic"], "shapley": [0.1, 0.05],
                                 "shapley_bound": [0.0, 0.0]})
    titles = [ax.get_title(loc="left") for ax in plots.contribution_plot(contribution, inst, gains).axes]
    assert "global test set" in titles[0] and "own test splits" in titles[2]


def test_every_scheme_has_its_own_marker_and_line_style():
    schemes = ["isolated", "pooled", "fedavg", "fedprox", "fedsgd", "ditto", "fedper", "finetune", "reptile"]
    styles = plots.scheme_styles(schemes)
    assert len({s.marker for s in styles.values()}) == len(schemes)
    assert len({(str(s.linestyle), s.marker, str(s.colour)) for s in styles.values()}) == len(schemes)
    assert plots.scheme_styles(["fedprox", "isolated", "fedavg"])["fedavg"] == plots.scheme_styles(["fedavg", "fedprox"])["fedavg"]


def test_equal_curves_are_drawn_apart():
    # Two schemes with identical curves: their lines must not be drawn on the same pixels.
    curve = pd.DataFrame([{"scenario": "s", "scheme": s, "round": r, "source": "global model", "mean": 0.5 + r / 10,
                           "low": 0.5 + r / 10, "high": 0.5 + r / 10, "runs": 1} for s in ("fedavg", "fedprox") for r in range(4)])
    fig = plots.accuracy_plot(curve)
    fig.draw_without_rendering()
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in ("fedavg", "fedprox")]
    pixels = [ln.get_transform().transform(ln.get_xydata()) for ln in lines]
    assert len(lines) == 2 and np.abs(pixels[0][:, 0] - pixels[1][:, 0]).min() > 3  # a few points apart
    assert lines[0].get_marker() != lines[1].get_marker() and lines[0].get_linestyle() != lines[1].get_linestyle()
    ylim = fig.axes[0].get_ylim()
    assert ylim[0] <= 0.5 and ylim[1] >= 0.8  # the limits hold the data although it is drawn shifted


def test_pareto_markers_and_labels_never_overlap():
    # fedavg and fedprox cost the same and score almost the same (as in the default compare); two more crowd in.
    costs = _costs([("isolated", 0.0, 0.83, True), ("fedavg", 1.75, 0.742, False), ("fedprox", 1.75, 0.738, False),
                    ("fedsgd", 1.76, 0.74, False), ("pooled", 1.3, 0.886, True)])
    fig = plots.pareto_plot(costs)
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    assert sorted(t.get_text() for t in ax.texts) == sorted(costs["scheme"])  # scheme names exactly as configured
    markers = []
    for coll in ax.collections:
        if len(coll.get_offsets()) and coll.get_sizes().max() > 0:
            x, y = coll.get_offset_transform().transform(coll.get_offsets())[0]
            markers.append(Bbox.from_bounds(x - 6, y - 6, 12, 12))  # the marker's inner 12 px
    assert len(markers) == len(costs)
    for a, b in combinations(labels, 2):
        assert not _overlap(a, b)
    for a, b in combinations(markers, 2):
        assert not _overlap(a, b)
    for label in labels:
        assert not any(_overlap(label, marker) for marker in markers)
        assert ax.get_window_extent().contains(label.x0, label.y0) and ax.get_window_extent().contains(label.x1, label.y1)


def test_side_by_side_spreads_only_points_that_coincide():
    points = np.array([[100.0, 100.0], [100.0, 100.0], [104.0, 101.0], [300.0, 100.0]])
    shifts = plots.side_by_side(points, gap=14.0)
    assert shifts[3] == 0.0  # alone: stays where it is
    moved = points[:3, 0] + shifts[:3]
    assert np.diff(np.sort(moved)).min() >= 14.0 - 4.0  # neighbours at least about a marker apart
    assert abs(shifts[:3].sum()) < 1e-9  # the group stays centred


def test_label_place_takes_the_first_free_spot_and_stays_inside():
    inside = Bbox.from_extents(0, 0, 200, 200)
    first = plots.label_place((100, 100), 40, 10, 8, [], inside)
    assert first.x0 == 108  # right of the anchor when nothing is in the way
    second = plots.label_place((100, 100), 40, 10, 8, [first], inside)
    assert not _overlap(first, second)
    edge = plots.label_place((195, 100), 40, 10, 8, [], inside)
    assert edge.x1 <= 200  # at the right edge the label goes left


def test_gain_plot_writes_institution_names_as_in_the_tables():
    metrics, _, _ = demo_tables(seeds=(0,), rounds=2)
    fig = plots.gain_plot(m.gain_summary(m.gain_table(metrics)))
    assert "city_hospital" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
