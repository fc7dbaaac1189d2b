"""Coalition values for contribution analysis: re-run a scenario on subsets of institutions, in parallel on Ray.

The value of a coalition is the final accuracy, on the full global test set, of the model
its members end up with when only they collaborate (same scheme, data, seed). The empty
coalition is worth the untrained model's accuracy. Up to ``exact_max`` institutions every
coalition is run (exact Shapley); beyond that only the prefixes of seeded random
permutations, the same ones :func:`analysis.contribution.monte_carlo_shapley` walks.

Each coalition is a Ray task that runs the simulation in-process (no actors of its own;
:func:`agents.runtime.tasks.map_tasks`), so many coalitions share the cluster's cores without
nesting actor start-ups. ``python -m sim.contribution RUN_DIR`` is the command
(``python -m analysis contribution RUN_DIR`` hands over to it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from sim.checks import load_spec

from sim.core import rundir
from sim.core.config import RunSpec, saved_config
from sim.core.types import GLOBAL, ConfigError

log = logging.getLogger("collabsim")


def load_run_spec(run_dir: Path) -> RunSpec:
    """The validated spec of the run whose resolved config.yaml lies in ``run_dir``."""
    cfg = saved_config(run_dir, "run_dir", "pass a run directory written by python -m sim")
    if "schemes" in cfg and (rundir.read_marker(run_dir, rundir.COMPARE_MARKER) or (Path(run_dir) / "runs").is_dir()):
        # (an experiment's runs carry its schemes key too, and are single runs)
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
    from agents.runtime.tasks import map_tasks

    spec = load_run_spec(run_dir)
    players = list(spec.scenario.names)
    wanted = coalitions_needed(players, exact_max, permutations, seed)
    values: dict[frozenset, float] = {}
    t0 = time.perf_counter()
    if spec.data.get("views"):  # a few coalitions of views, each seconds of small bottoms: in this process, no Ray
        done = ((sorted(c), _value(spec, sorted(c))) for c in wanted)
    else:
        done = map_tasks(_value, spec, [sorted(c) for c in wanted], cpus=cpus_per_coalition, cluster=spec.cluster)
    for members, (value, untrained) in done:
        values[frozenset(members)], values[frozenset()] = value, untrained
        log.info("coalition %d/%d done (%d members)  %.0fs", len(values) - 1, len(wanted), len(members),
                 time.perf_counter() - t0)
    return values, players


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sim.contribution RUN_DIR``: Shapley and leave-one-out values, their tables and the report.

    Bad input (a missing directory, one without a runnable config) ends with one line on stderr and exit status 2.
    """
    from analysis.contribution import contribution_table
    from analysis.report import build_report
    from analysis.runs import RunDirError, find_run_dirs
    from sim.core.results import write_table

    args = parser().parse_args(argv)
    try:
        find_run_dirs([args.run_dir])
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # one progress line per coalition
        out = args.out if args.out is not None else Path(args.run_dir)
        values, players = coalition_values(args.run_dir, exact_max=args.exact_max,
                                           permutations=args.permutations, seed=args.seed)
    except (RunDirError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = contribution_table(values, players, exact_max=args.exact_max, permutations=args.permutations,
                               seed=args.seed, value_range=(0.0, 1.0))
    write_table(table, out / "tables" / "contribution.parquet")
    table.to_csv(out / "tables" / "contribution.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(build_report([args.run_dir], out, contribution=table))
    return 0


def parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m sim.contribution`` (and of ``python -m analysis contribution``, which hands over)."""
    p = argparse.ArgumentParser(prog="python -m sim.contribution",
                                description="Shapley and leave-one-out values by re-running coalitions on Ray")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The contribution command's arguments, on ``p``."""
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run whose scenario is split into coalitions")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR)")
    p.add_argument("--exact-max", type=int, default=8, help="exact Shapley up to this many institutions")
    p.add_argument("--permutations", type=int, default=200, help="Monte-Carlo permutations beyond --exact-max")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation sampler")


if __name__ == "__main__":
    from sim.cli import finish

    code = main()
    finish(code)  # the coalitions ran on Ray: end it now
    sys.exit(code)
