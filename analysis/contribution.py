"""Contribution of each institution to the merged model: leave-one-out and Shapley values.

Pure maths over a *value function* v(coalition) -> float, e.g. the merged model's final
accuracy when only that coalition of institutions trains together. Who computes v (re-running
the simulation on every coalition, in parallel on Ray) is the runner's business
(``sim.contribution``); it hands this module a mapping ``frozenset(names) -> value``.

- Leave-one-out: v(N) - v(N without i). Needs n + 1 coalitions.
- Exact Shapley: the average marginal contribution over all orders in which the
  institutions could join; needs all 2^n coalitions, the empty one included (the value of
  no collaboration, e.g. the untrained model's accuracy). Practical up to about 8.
- Monte-Carlo permutation Shapley (Castro, Gomez & Tejada 2009): the same average over
  ``m`` random orders from a seeded RNG. Its error is stated two ways: the standard error
  of the mean marginal contribution, and a Hoeffding bound that holds with probability
  ``confidence`` whatever the game, since each marginal contribution lies within
  [-(hi - lo), hi - lo] when values lie in [lo, hi]:  eps = 2 (hi - lo) sqrt(ln(2/delta) / (2m)).
"""

from __future__ import annotations

from itertools import combinations
from math import factorial
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

Coalition = frozenset
Values = Mapping[frozenset, float]
ValueFunction = Callable[[frozenset], float]


def value_function(values: Values | ValueFunction) -> ValueFunction:
    """Wrap a mapping of coalition values as a function that names any missing coalition."""
    if callable(values):
        return values
    table = {frozenset(k): float(v) for k, v in values.items()}

    def v(coalition: frozenset) -> float:
        try:
            return table[frozenset(coalition)]
        except KeyError:
            raise KeyError(f"no value for coalition {sorted(coalition)}") from None

    return v


def leave_one_out(values: Values | ValueFunction, players: Sequence[str]) -> dict[str, float]:
    """Each player's leave-one-out value: v(all) - v(all but the player)."""
    v = value_function(values)
    everyone = frozenset(players)
    return {p: v(everyone) - v(everyone - {p}) for p in players}


def exact_shapley(values: Values | ValueFunction, players: Sequence[str], max_players: int = 8) -> dict[str, float]:
    """Exact Shapley values by enumerating all 2^n coalitions (refuses more than ``max_players``)."""
    n = len(players)
    if n > max_players:
        raise ValueError(f"exact Shapley over {n} players needs 2^{n} coalitions; use monte_carlo_shapley or raise max_players")
    v = value_function(values)
    cache = {frozenset(c): v(frozenset(c)) for k in range(n + 1) for c in combinations(players, k)}
    weight = [factorial(k) * factorial(n - k - 1) / factorial(n) for k in range(n)]
    result = {}
    for p in players:
        others = [q for q in players if q != p]
        result[p] = sum(
            weight[k] * (cache[frozenset(s) | {p}] - cache[frozenset(s)])
            for k in range(n) for s in combinations(others, k)
        )
    return result


def monte_carlo_shapley(
    values: Values | ValueFunction,
    players: Sequence[str],
    *,
    permutations: int = 1000,
    seed: int = 0,
    value_range: tuple[float, float] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Permutation-sampling Shapley estimate with its standard error and Hoeffding bound per player.

    ``value_range`` (lo, hi) bounds the value function, e.g. (0, 1) for accuracy; without it
    the range of the values seen while sampling is used, which makes the bound approximate.
    Returns columns institution, shapley, shapley_se, shapley_bound.
    """
    v = value_function(values)
    cache: dict[frozenset, float] = {}

    def value(c: frozenset) -> float:
        if c not in cache:
            cache[c] = v(c)
        return cache[c]

    rng = np.random.default_rng(seed)
    index = {p: i for i, p in enumerate(players)}
    marginals = np.empty((permutations, len(players)))
    for m in range(permutations):
        coalition: frozenset = frozenset()
        before = value(coalition)
        for j in rng.permutation(len(players)):
            coalition = coalition | {players[j]}
            after = value(coalition)
            marginals[m, index[players[j]]] = after - before
            before = after
    lo, hi = value_range if value_range is not None else (min(cache.values()), max(cache.values()))
    bound = hoeffding_bound(permutations, hi - lo, confidence)
    se = marginals.std(axis=0, ddof=1) / np.sqrt(permutations) if permutations > 1 else np.full(len(players), np.nan)
    return pd.DataFrame({
        "institution": list(players), "shapley": marginals.mean(axis=0), "shapley_se": se, "shapley_bound": bound,
    })


def hoeffding_bound(samples: int, value_span: float, confidence: float = 0.95) -> float:
    """Half-width eps with P(|estimate - Shapley| >= eps) <= 1 - confidence, for marginals within +-value_span."""
    delta = 1 - confidence
    return float(2 * value_span * np.sqrt(np.log(2 / delta) / (2 * samples)))


def contribution_table(
    values: Values | ValueFunction,
    players: Sequence[str],
    *,
    exact_max: int = 8,
    permutations: int = 1000,
    seed: int = 0,
    value_range: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Shapley (exact up to ``exact_max`` players, Monte-Carlo beyond) and leave-one-out per institution.

    Columns: institution, shapley, shapley_se, shapley_bound (0 when exact; the Hoeffding
    half-width at 95% otherwise), loo (NaN when its coalitions are missing), method.
    """
    if len(players) <= exact_max:
        phi = exact_shapley(values, players, max_players=exact_max)
        table = pd.DataFrame({"institution": list(players), "shapley": [phi[p] for p in players],
                              "shapley_se": 0.0, "shapley_bound": 0.0, "method": "exact"})
    else:
        table = monte_carlo_shapley(values, players, permutations=permutations, seed=seed, value_range=value_range)
        table["method"] = f"monte carlo ({permutations} permutations)"
    try:
        loo = leave_one_out(values, players)
    except KeyError:
        loo = {}
    table["loo"] = [loo.get(p, np.nan) for p in players]
    return table[["institution", "shapley", "shapley_se", "shapley_bound", "loo", "method"]]
