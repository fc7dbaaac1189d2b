"""Sensitivity sweeps (search: sobol): the design, and bad levers refused with one line before anything runs.

A real sweep through Tune starts Ray (about 50 CPU seconds for the smallest design of 32 one-round trials, measured),
more than this suite's budget: tests/analysis/test_sensitivity.py runs the analysis and the report end to end on a
sweep directory written with the same design code and the results schema."""

import subprocess
import sys

import pandas as pd
import pytest
from omegaconf import open_dict

from sim.cli import compose, guard
from sim.sweep.design import DESIGN_ROW
from sim.sweep.space import load_sweep, param_space, trial_overrides, trial_values

TWO_LEVERS = {"scheme": {"grid": ["isolated", "fedavg"]}, "data.between": {"uniform": [0.0, 1.0]},
              "data.num_samples": {"randint": [1200, 2400]}}
TINY_SWEEP = """name: sens_tiny
search: sobol
num_samples: 4
overrides: [rounds=1, checkpoint_every=0, engine.eval_every=1]
space:
  scheme: {grid: [isolated, fedavg]}
  data.between: {uniform: [0.0, 1.0]}
  data.num_samples: {randint: [1200, 2400]}
seeds: [0]
metric: mean_accuracy
"""


def sobol(**fields):
    """A sensitivity sweep spec from the shipped file plus ``fields``."""
    return load_sweep({**compose("sweep_main", ["sweep=sensitivity"]).sweep, **fields})


def test_a_sobol_design_crosses_its_points_with_the_grid_and_seeds_and_stays_inside_the_ranges():
    spec = sobol(space={**TWO_LEVERS, "training.lr": {"loguniform": [0.01, 0.1]}}, num_samples=8, seeds=[0, 1])
    points = pd.DataFrame(param_space(spec, seed=3)["sample"]["grid_search"])
    assert spec.design_points == len(points) == 8 * (3 + 2) and spec.trial_count() == 2 * 40 * 2
    assert list(points[DESIGN_ROW]) == list(range(40))  # Saltelli's order: the analysis pairs rows by it
    assert points["data.between"].between(0, 1).all() and points["training.lr"].between(0.01, 0.1).all()
    assert points["data.num_samples"].map(type).eq(int).all() and points["data.num_samples"].between(1200, 2400).all()
    assert param_space(spec, seed=3)["sample"] == param_space(spec, seed=3)["sample"] != param_space(spec, 4)["sample"]
    assert param_space(spec, seed=0)["sample"] == param_space(spec, seed=0)["sample"]  # the run config's default seed
    values = trial_values(spec, {"scheme": "fedavg", "sample": points.iloc[7].to_dict(), "seed": 1})
    assert values[DESIGN_ROW] == 7 and not any(o.startswith(DESIGN_ROW) for o in trial_overrides(values))


def test_the_shipped_sensitivity_sweep_passes_the_check_and_smoke_keeps_the_smallest_design():
    from sim.sweep import check

    spec = check(compose("sweep_main", ["sweep=sensitivity"]), ["sweep=sensitivity"])  # every lever's ends compose
    assert spec.design_points == 32 * 6 and spec.trial_count() == 3 * 192
    assert sobol().num_samples == 32 and load_sweep(compose("sweep_main", ["sweep=sensitivity"]).sweep,
                                                    smoke=True).num_samples == 4


@pytest.mark.parametrize("lever, spec, named", [
    ("data.beta", {"uniform": [0.5]}, "sweep.space.data.beta: uniform needs [lo, hi] with lo < hi, got [0.5]"),
    ("data.beta", None, "sweep.space.data.beta: expected {kind: [..]} with kind one of grid, choice, uniform"),
    ("data.num_samples", {"uniform": [2000, 12000]},
     "sweep.space.data.num_samples: data.num_samples is a whole number in the run config (6000) and uniform draws "
     "fractions; use {randint: [2000, 12000]}"),
    ("data.beta", {"choice": [0.1, 0.9]}, "sweep.space.data.beta: search=sobol samples levers from ranges"),
    ("training.optimizer", {"uniform": [0, 1]},
     "sweep.space.training.optimizer: a lever must be a number, and training.optimizer is 'sgd'"),
    ("data.beta", {"uniform": ["low", "high"]}, "sweep.space.data.beta: uniform needs [lo, hi] with lo < hi"),
])
def test_a_lever_without_a_range_or_with_one_of_the_wrong_type_fails_with_one_line_naming_it(lever, spec, named, capsys):
    err = refused(lambda cfg: cfg.sweep.space.__setitem__(lever, spec), capsys)
    assert named in err


@pytest.mark.parametrize("base, named", [
    (2, "sweep.num_samples: search=sobol takes N, the design's base sample, a power of two >= 4 (the design runs "
        "N x (levers + 2) points), got 2; use 4"),
    (24, "sweep.num_samples: search=sobol takes N, the design's base sample, a power of two >= 4 (the design runs "
         "N x (levers + 2) points), got 24; use 16 or 32"),
])
def test_a_design_too_small_for_sobol_indices_fails_with_one_line(base, named, capsys):
    assert named in refused(lambda cfg: cfg.sweep.__setitem__("num_samples", base), capsys)


def refused(edit, capsys) -> str:
    """The one line (exit status 2) that ``check`` gives the shipped sensitivity sweep after ``edit(cfg)``."""
    from sim.sweep import check

    def edited(cfg):
        with open_dict(cfg):  # a lever the shipped file does not have
            edit(cfg)
        check(cfg, ["sweep=sensitivity"])

    with pytest.raises(SystemExit) as exit_:
        guard("sweep_main", ["sweep=sensitivity"], edited)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    return err


def test_the_command_refuses_a_bad_sensitivity_sweep_before_any_trial(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "bad.yaml").write_text(TINY_SWEEP.replace("num_samples: 4", "num_samples: 3"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sim.sweep", "--config-dir", str(tmp_path), "sweep=bad",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: sweep.num_samples: search=sobol takes N") and not out.exists()


def test_a_single_lever_is_too_few_for_sobol_indices():
    from sim.core.types import ConfigError

    with pytest.raises(ConfigError, match="sweep.space: search=sobol apportions an outcome's variance among levers, "
                                          "and has 1 lever with a range"):
        sobol(space={"scheme": {"grid": ["isolated"]}, "data.between": {"uniform": [0.0, 1.0]}})
