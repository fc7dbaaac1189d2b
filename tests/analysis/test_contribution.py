"""Shapley and leave-one-out on games with known answers."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from analysis.contribution import (
    contribution_table,
    exact_shapley,
    hoeffding_bound,
    leave_one_out,
    monte_carlo_shapley,
)

PLAYERS = ["left", "right1", "right2"]


def glove_game() -> dict[frozenset, float]:
    """One left glove, two right gloves: a coalition is worth 1 when it holds a pair."""
    return {frozenset(c): float("left" in c and ("right1" in c or "right2" in c))
            for k in range(4) for c in combinations(PLAYERS, k)}


def test_exact_shapley_glove_game():
    # Known answer: the scarce left glove gets 2/3, each right glove 1/6.
    phi = exact_shapley(glove_game(), PLAYERS)
    assert phi["left"] == pytest.approx(2 / 3, abs=1e-12)
    assert phi["right1"] == pytest.approx(1 / 6, abs=1e-12)
    assert phi["right2"] == pytest.approx(1 / 6, abs=1e-12)


def test_exact_shapley_weighted_voting_game():
    # Quota 4, weights 3, 2, 1, 1. By enumerating the 24 orders: a is pivotal in 12, b, c and d
    # in 4 each, so b's extra weight buys it no extra power (Shapley-Shubik index 1/2, 1/6, 1/6, 1/6).
    weights = {"a": 3, "b": 2, "c": 1, "d": 1}
    players = list(weights)
    game = {frozenset(s): float(sum(weights[p] for p in s) >= 4) for k in range(5) for s in combinations(players, k)}
    phi = exact_shapley(game, players)
    assert phi["a"] == pytest.approx(1 / 2, abs=1e-12)
    for p in "bcd":
        assert phi[p] == pytest.approx(1 / 6, abs=1e-12)
    assert sum(phi.values()) == pytest.approx(1.0, abs=1e-12)  # efficiency: v(N) - v(empty)


def test_leave_one_out_glove_game():
    loo = leave_one_out(glove_game(), PLAYERS)
    assert loo == {"left": 1.0, "right1": 0.0, "right2": 0.0}  # a second right glove is redundant alone


def test_monte_carlo_converges_within_its_bound():
    exact = exact_shapley(glove_game(), PLAYERS)
    mc = monte_carlo_shapley(glove_game(), PLAYERS, permutations=2000, seed=0, value_range=(0.0, 1.0)).set_index("institution")
    bound = hoeffding_bound(2000, 1.0)
    assert mc["shapley_bound"].iloc[0] == pytest.approx(bound)
    for p in PLAYERS:
        err = abs(mc.loc[p, "shapley"] - exact[p])
        assert err <= bound  # guaranteed with probability 95% for any seed; seed 0 is fixed
        assert err <= 4 * mc.loc[p, "shapley_se"]  # and close in standard errors (CLT)
    # every permutation's marginals add up to v(N) - v(empty): the estimate is exactly efficient
    assert mc["shapley"].sum() == pytest.approx(1.0, abs=1e-12)


def test_monte_carlo_is_seeded():
    a = monte_carlo_shapley(glove_game(), PLAYERS, permutations=50, seed=3)
    b = monte_carlo_shapley(glove_game(), PLAYERS, permutations=50, seed=3)
    assert a.equals(b)


def test_hoeffding_bound_shrinks_with_samples():
    assert hoeffding_bound(400, 1.0) == pytest.approx(hoeffding_bound(100, 1.0) / 2)
    assert hoeffding_bound(1000, 1.0) == pytest.approx(2 * np.sqrt(np.log(2 / 0.05) / 2000))


def test_contribution_table_exact_then_monte_carlo():
    table = contribution_table(glove_game(), PLAYERS)
    assert list(table.columns) == ["institution", "shapley", "shapley_se", "shapley_bound", "loo", "method"]
    assert (table["method"] == "exact").all() and (table["shapley_se"] == 0).all()
    assert table.set_index("institution").loc["left", "loo"] == 1.0
    mc = contribution_table(glove_game(), PLAYERS, exact_max=2, permutations=300, value_range=(0, 1))
    assert mc["method"].str.startswith("monte carlo").all() and (mc["shapley_se"] > 0).any()


def test_callable_value_function_and_missing_coalitions():
    additive = {"a": 0.1, "b": 0.2, "c": 0.3}
    phi = exact_shapley(lambda s: sum(additive[p] for p in s), list(additive))
    assert phi == pytest.approx(additive)  # in an additive game everyone gets their own value
    with pytest.raises(KeyError, match="no value for coalition"):
        exact_shapley({frozenset(PLAYERS): 1.0}, PLAYERS)
    table = contribution_table(lambda s: float(len(s)), ["a", "b"])
    assert table["loo"].tolist() == [1.0, 1.0]


def test_exact_refuses_too_many_players():
    with pytest.raises(ValueError, match="monte_carlo_shapley"):
        exact_shapley(lambda s: 0.0, [str(i) for i in range(9)])
