"""Coalition values for contribution analysis: re-run a scenario on subsets of institutions, in parallel on Ray.

The value of a coalition is the final accuracy, on the full global test set, of the model
its members end up with when only they collaborate (same scheme, data, seed). The empty
coalition is worth the untrained model's accuracy. Up to ``exact_max`` institutions every
coalition is run (exact Shapley); beyond that only the prefixes of seeded random
permutations, the same ones :func:`analysis.contribution.monte_carlo_shapley` walks.

Like the Tune entry (sim/sweep/) this module sits at the edge and imports Ray: each
coalition is a Ray task that runs the simulation in-process (no actors of its own), so
many coalitions share the cluster's cores without nesting actor start-ups.
"""

from __future__ import annotations

import logging
import time
from itertools import combinations
from pathlib import Path
from typing import Iterable

import numpy as np

from sim.config import RunSpec, load_spec, saved_config
from sim.types import GLOBAL, ConfigError

log = logging.getLogger("collabsim")


def load_run_spec(run_dir: Path) -> RunSpec:
    """The validated spec of the run whose resolved config.yaml lies in ``run_dir``."""
    cfg = saved_config(run_dir, "run_dir", "pass a run directory written by python -m sim")
    if "schemes" in cfg:
        raise ConfigError("run_dir", f"{run_dir} is a compare directory; pass one of its runs/<scheme> folders")
    return load_spec(cfg)


def coalitions_needed(players: list[str], exact_max: int, permutations: int, seed: int) -> list[frozenset]:
    """Every coalition exact Shapley, leave-one-out or the sampled permutations will ask for."""
    n = len(players)
    if n <= exact_max:
        wanted = {frozenset(c) for k in range(1, n + 1) for c in combinations(players, k)}
    else:
        rng = np.random.default_rng(seed)  # the same stream monte_carlo_shapley draws its permutations from
        wanted = set()
        for _ in range(permutations):
            order = rng.permutation(n)
            wanted |= {frozenset(players[j] for j in order[: k + 1]) for k in range(n)}
        wanted |= {frozenset(players) - {p} for p in players} | {frozenset(players)}
    return sorted((c for c in wanted if c), key=lambda c: (len(c), sorted(c)))


def _value(spec: RunSpec, coalition: Iterable[str]) -> tuple[float, float]:
    """(final global accuracy of the coalition's model, accuracy before training)."""
    from sim.engine import run

    m = run(spec, backend="inprocess", institutions=tuple(coalition)).metrics
    acc = m[(m.institution == GLOBAL) & (m.metric == "accuracy")].set_index("round").value
    return float(acc.iloc[-1]), float(acc.loc[0])


def coalition_values(
    run_dir: Path, *, exact_max: int = 8, permutations: int = 200, seed: int = 0, cpus_per_coalition: float = 1.0
) -> tuple[dict[frozenset, float], list[str]]:
    """Run the needed coalitions of a run's scenario on Ray; return their values and the players."""
    import ray

    from agents.cluster import connect

    spec = load_run_spec(run_dir)
    players = list(spec.scenario.names)
    wanted = coalitions_needed(players, exact_max, permutations, seed)
    connect(dict(spec.cluster))
    task = ray.remote(num_cpus=cpus_per_coalition)(_value)
    spec_ref = ray.put(spec)
    pending = {task.remote(spec_ref, sorted(c)): c for c in wanted}
    values: dict[frozenset, float] = {}
    t0 = time.perf_counter()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        coalition = pending.pop(done[0])
        values[coalition], values[frozenset()] = ray.get(done[0])
        log.info("coalition %d/%d done (%d members)  %.0fs", len(values) - 1, len(wanted), len(coalition),
                 time.perf_counter() - t0)
    return values, players
