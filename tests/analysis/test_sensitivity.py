"""Sobol' indices of a sensitivity sweep: the Ishigami check, outcomes without variance or with gaps, sentences, maps.

The Ishigami function's first-order and total indices are known in closed form (Ishigami and
Homma 1990; Saltelli et al. 2008, section 4.3): the design comes from the sweep's own design
code (sim.sweep.design) and the indices from the analysis's own code (analysis.sensitivity).
"""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import maps
from analysis.sensitivity import MEAN_GAIN, indices, sentence
from sim.sweep.design import DESIGN_ROW, record, sobol_design
from sim.sweep.space import Dimension

A, B = 7.0, 0.1


def ishigami_indices() -> tuple[np.ndarray, np.ndarray]:
    """Analytic first-order and total indices of Ishigami's function with a = 7, b = 0.1, inputs U(-pi, pi)."""
    v1 = 0.5 * (1 + B * math.pi ** 4 / 5) ** 2
    v2 = A ** 2 / 8
    v13 = B ** 2 * math.pi ** 8 * (1 / 18 - 1 / 50)
    var = v1 + v2 + v13
    return np.array([v1, v2, 0.0]) / var, np.array([v1 + v13, v2, v13]) / var


def design_table(levers, base, seed, f):
    """The sweep's design for ``levers`` and a trials-like table of ``f`` at each point (one scheme, one outcome)."""
    points = sobol_design(levers, base, seed)
    x = np.array([[p[d.key] for d in levers] for p in points])
    table = pd.DataFrame({"scheme": "model", "outcome": "y", DESIGN_ROW: [p[DESIGN_ROW] for p in points], "value": f(x)})
    return record(levers, base, seed, {}, [0]), table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ishigami_indices_match_the_analytic_values_within_their_intervals(seed):
    # Prepare: three levers on [-pi, pi], N = 1024 (5,120 points); the design's seed changes every point.
    levers = [Dimension(f"x{i}", "uniform", (-math.pi, math.pi)) for i in (1, 2, 3)]
    design, table = design_table(levers, 1024, seed, lambda x: np.sin(x[:, 0]) + A * np.sin(x[:, 1]) ** 2
                                 + B * x[:, 2] ** 4 * np.sin(x[:, 0]))
    # Execute
    got = indices(design, table).set_index("lever").loc[["x1", "x2", "x3"]]
    # Assert: every analytic value lies inside its 95% interval, and the intervals are narrow enough to mean something.
    s1, st = ishigami_indices()
    assert ((got["S1_low"] <= s1) & (s1 <= got["S1_high"])).all(), got[["S1_low", "S1", "S1_high"]]
    assert ((got["ST_low"] <= st) & (st <= got["ST_high"])).all(), got[["ST_low", "ST", "ST_high"]]
    assert (got["S1_high"] - got["S1_low"] < 0.25).all() and (got["ST_high"] - got["ST_low"] < 0.25).all()


def test_a_lever_that_does_nothing_gets_total_index_near_zero_and_the_sentence_says_so():
    levers = [Dimension("heterogeneity", "uniform", (0.0, 1.0)), Dimension("size", "randint", (100, 200)),
              Dimension("noise", "loguniform", (0.01, 1.0))]
    design, table = design_table(levers, 256, 0, lambda x: 10 * x[:, 0] + 0.001 * x[:, 2])
    got = indices(design, table.assign(outcome=MEAN_GAIN, scheme="fedavg"))
    pd.testing.assert_frame_equal(got, indices(design, table.assign(outcome=MEAN_GAIN, scheme="fedavg")))  # seeded bootstrap
    by = got.set_index("lever")
    assert by.loc["heterogeneity", "S1"] == pytest.approx(1.0, abs=0.05)
    assert by.loc["size", "ST_high"] < 0.05 and by.loc["noise", "ST_high"] < 0.05
    said = sentence(got)
    assert said.startswith("Under fedavg, the mean gain (from +0.0 to +10.0 points over the design) depends most on "
                           "heterogeneity: alone it explains 100%")
    assert said.endswith("; size and noise each explain under 5%.")  # in the order of the levers


def test_an_outcome_without_variance_or_with_a_missing_point_gets_no_indices_and_says_why():
    levers = [Dimension("a", "uniform", (0.0, 1.0)), Dimension("b", "uniform", (0.0, 1.0))]
    design, table = design_table(levers, 4, 0, lambda x: np.zeros(len(x)))
    gap = table.assign(outcome="z", value=table["value"] + table[DESIGN_ROW]).iloc[1:]
    got = indices(design, pd.concat([table, gap]))
    flat, holed = got[got["outcome"] == "y"], got[got["outcome"] == "z"]
    assert flat["S1"].isna().all() and flat["note"].str.contains("no variance").all()
    assert holed["ST"].isna().all() and holed["note"].str.startswith("1 of 16 design points have no value").all()
    assert "no indices (the same value at every design point" in sentence(flat)


def test_a_collaboration_map_bins_the_points_and_draws_the_frontier_where_the_gain_changes_sign():
    # The mean gain is x - y (in points): collaboration pays below the diagonal; institution "b" is worse off everywhere.
    levers = [Dimension("x", "uniform", (0.0, 1.0)), Dimension("y", "uniform", (0.0, 1.0))]
    points = pd.DataFrame(sobol_design(levers, 64, 0))
    levels = points.assign(scheme="fedavg", outcome=MEAN_GAIN, value=points["x"] - points["y"])
    gains = pd.concat([points.assign(scheme="fedavg", institution="a", gain=1.0),
                       points.assign(scheme="fedavg", institution="b", gain=-1.0)])
    design = record(levers, 64, 0, {}, [0])
    edges = (np.linspace(0, 1, 5), np.linspace(0, 1, 5))
    grid = maps.binned(levels, "x", "y", "value", edges)
    assert grid[0, 3] > 0.5 and grid[3, 0] < -0.5  # rows are y, columns x
    assert np.allclose(maps.binned(gains, "x", "y", "gain", edges, how="share"), 0.5)
    fig = maps.collaboration_map(levels, gains, *design["levers"], int(design["points"]))
    left = fig.axes[0]
    assert any(type(c).__name__ == "QuadContourSet" for c in left.get_children())  # the gain = 0 frontier
    assert left.get_title(loc="left") == "fedavg: mean gain over alone"


# ---- a sweep directory end to end: python -m analysis sensitivity, then the report ----------------

LEVERS = [Dimension("data.between", "uniform", (0.0, 1.0)), Dimension("data.num_samples", "randint", (1000, 3000))]


def sweep_tables(base: int):
    """A sensitivity sweep's tables as the sweep writes them: every design point run isolated and under fedavg.

    Institution A gains 20 x (0.5 - between) points under fedavg, B gains 10 x (size - 2000) / 1000: A's gain depends on
    data.between alone, B's on data.num_samples alone. Two rounds; compute (so money) grows with the size.
    """
    from sim.core.results import frame

    points = sobol_design(LEVERS, base, 0)
    metrics, ledger, institutions, trials = [], [], [], []
    for p in points:
        between, size = p["data.between"], p["data.num_samples"]
        for scheme in ("isolated", "fedavg"):
            final = {"A": 0.7, "B": 0.6} if scheme == "isolated" else {
                "A": 0.7 + 0.2 * (0.5 - between), "B": 0.6 + 0.1 * (size - 2000) / 1000}
            run = {"run_id": f"{scheme}-{p[DESIGN_ROW]}", "scheme": scheme,
                   "scenario": f"default (design point {p[DESIGN_ROW]})", "seed": 0}
            trials.append({**run, "trial_id": f"t{len(trials)}", "status": "complete", DESIGN_ROW: p[DESIGN_ROW],
                           "data.between": between, "data.num_samples": size})
            for who, acc in final.items():
                for rnd, value in ((0, 0.1), (1, 0.9 * acc), (2, acc)):
                    for metric, v in (("accuracy", value), ("loss", 1 - value)):
                        metrics.append({**run, "round": rnd, "institution": who, "discipline": who.lower(),
                                        "metric": metric, "value": v})
                    if rnd:
                        ledger.append({**run, "round": rnd, "institution": who, "participated": True, "bytes_up": 1000,
                                       "bytes_down": 1000, "sim_compute_seconds": size / 1000, "sim_time": rnd * size / 500,
                                       "samples": size // 2, "status": "ok", "work_done": 1.0})
                institutions.append({**run, "institution": who, "discipline": who.lower(), "share": 0.5,
                                     "train_samples": size // 2, "test_samples": 50, "cpus": 1.0, "gpus": 0.0,
                                     "behaviour": "honest"})
    return (pd.DataFrame(trials), frame("metrics", metrics), frame("ledger", ledger), frame("institutions", institutions))


PRICES = {"currency": "USD", "cpu_hour": 0.04, "gpu_hour": 3.0, "gb": 0.09, "cpu_watts": 5.0, "gpu_watts": 300.0,
          "kwh": 0.0, "co2_per_kwh": None, "scale": 1.0, "institutions": {}}


def test_each_institutions_gain_is_traced_to_the_lever_that_moves_it():
    from analysis.sensitivity import WORST_GAIN, gain_of, outcomes

    trials, metrics, ledger, institutions = sweep_tables(32)
    design = record(LEVERS, 32, 0, {"scheme": ["isolated", "fedavg"]}, [0])
    table = outcomes(trials, metrics, ledger, institutions, {})  # no directory, no prices: no money to target
    assert set(table["outcome"]) == {MEAN_GAIN, WORST_GAIN, gain_of("A"), gain_of("B")}
    mean = table[(table["outcome"] == MEAN_GAIN) & (table["scheme"] == "fedavg")].set_index(DESIGN_ROW)["value"]
    point = sobol_design(LEVERS, 32, 0)[5]
    assert mean[5] == pytest.approx((20 * (0.5 - point["data.between"]) + 10 * (point["data.num_samples"] - 2000) / 1000) / 2)
    got = indices(design, table).set_index(["outcome", "lever"])
    for institution, lever, other in (("A", "data.between", "data.num_samples"), ("B", "data.num_samples", "data.between")):
        mine, not_mine = got.loc[(gain_of(institution), lever)], got.loc[(gain_of(institution), other)]
        assert mine["S1_low"] <= 1.0 <= mine["S1_high"] and mine["ST_low"] <= 1.0 <= mine["ST_high"]
        assert not_mine["ST_high"] < 0.05  # a lever that does not touch an institution's gain


def test_analysis_sensitivity_and_the_report_read_a_sensitivity_sweep_directory(tmp_path, capsys):
    import json

    import yaml

    from analysis.__main__ import main
    from sim.core.results import write_table

    trials, metrics, ledger, institutions = sweep_tables(4)
    for name, df in (("trials", trials), ("metrics", metrics), ("ledger", ledger), ("institutions", institutions)):
        write_table(df, tmp_path / f"{name}.parquet")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "rounds": 2, "costs": PRICES}))
    (tmp_path / "design.json").write_text(json.dumps(record(LEVERS, 4, 0, {"scheme": ["isolated", "fedavg"]}, [0])))
    # Execute: the command, then the report
    assert main(["sensitivity", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 0
    # Assert
    assert text.startswith("Sobol' indices, 16 design points (N = 4) over 2 levers: data.between [0, 1], "
                           "data.num_samples [1000, 3000]; S1 first order, ST total, [95% bootstrap interval]")
    assert "  - Under fedavg, the gain of A (from -7.0 to +9.8 points over the design)" in text  # its 16 points' range
    table = pd.read_csv(tmp_path / "sensitivity" / "indices.csv")
    assert set(table.loc[table["scheme"] == "isolated", "outcome"]) == {"money to target"}  # its gains are 0 by definition
    assert (tmp_path / "sensitivity" / "map_data.between__data.num_samples.png").stat().st_size > 10_000
    page = (tmp_path / "report.html").read_text()
    assert '<section id="sensitivity">' in page and "Collaboration maps" in page and "Under fedavg, the mean gain" in page
    assert '<section id="findings' not in page  # a design point is not a scenario reported on its own
    assert (tmp_path / "tables" / "sensitivity_indices.csv").is_file()
