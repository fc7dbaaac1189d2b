"""Coalition runner: which coalitions it runs, and values that add up to the grand coalition's gain."""

import pytest

from analysis.contribution import contribution_table
from sim.contribution import coalition_values, coalitions_needed
from sim.engine import run


def test_exact_mode_asks_for_every_non_empty_coalition():
    wanted = coalitions_needed(["a", "b", "c"], exact_max=8, permutations=10, seed=0)
    assert len(wanted) == 7 and frozenset() not in wanted


def test_sampled_mode_asks_for_permutation_prefixes_and_leave_one_out():
    players = [f"p{i}" for i in range(10)]
    wanted = set(coalitions_needed(players, exact_max=8, permutations=3, seed=0))
    assert frozenset(players) in wanted
    assert all(frozenset(players) - {p} in wanted for p in players)
    assert len(wanted) <= 3 * 10 + 10  # at most one prefix per step of each permutation, plus leave-one-out


def test_shapley_values_of_a_real_run_add_up_to_the_grand_coalition(small_cfg, tmp_path, ray_cluster):
    # Prepare: a three-institution run on disk
    cfg = small_cfg("scenario.num_institutions=3", "rounds=2")
    run(cfg, tmp_path, backend="inprocess")
    # Execute
    values, players = coalition_values(tmp_path, cpus_per_coalition=0.5)
    table = contribution_table(values, players)
    # Assert: efficiency — Shapley values sum to v(all) - v(empty); float sums of 7 terms, 1e-9 is ample
    assert len(values) == 8 and len(players) == 3
    grand = values[frozenset(players)] - values[frozenset()]
    assert table.shapley.sum() == pytest.approx(grand, abs=1e-9)
