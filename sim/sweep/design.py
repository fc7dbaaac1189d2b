"""Sobol' designs for ``search: sobol``: the levers' values of every design point, drawn with SALib.

A sensitivity sweep (``conf/sweep/sensitivity.yaml``) lists its *levers* as ranges in
``sweep.space`` (``{uniform|loguniform|randint: [lo, hi]}``) and its base sample N as
``num_samples``. Saltelli's scheme as SALib implements it (``SALib.sample.sobol``, a
scrambled Sobol' sequence; Saltelli et al. 2010) draws two N x D matrices A and B in
the unit cube and, for each lever i, A with column i taken from B: N x (D + 2) points
without second-order terms. Each point is scaled to the levers' ranges here (log-scaled
for loguniform, whole numbers for randint: a bijection per coordinate, so first-order and
total indices keep their meaning); its place in the design is its ``design_row``, which
``python -m analysis sensitivity`` needs to pair A, B and the A_B^i rows again. Grid
dimensions (the scheme) are crossed with every point, and so are seeds.

Pure Python and numpy; no Ray. ``design.json`` (:func:`record`) is the contract with
``analysis.sensitivity``, which reads results only.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from sim.core.results import DESIGN_FILE, DESIGN_ROW  # noqa: F401 - the contract with analysis.sensitivity
from sim.core.types import ConfigError

LEVER_KINDS = ("uniform", "loguniform", "randint")
MIN_BASE = 4  # fewest base points: SALib's bootstrap intervals need several A/B pairs; below this they are noise


def points(base: int, levers: int) -> int:
    """Design points of a Sobol' design without second-order indices: N x (D + 2)."""
    return base * (levers + 2)


def require_salib() -> None:
    """Refuse search=sobol, before anything runs, where SALib is not installed."""
    try:
        import SALib  # noqa: F401
    except ImportError:
        raise ConfigError("sweep.search", "sobol needs SALib: pip install 'collabsim[sensitivity]'") from None


def check_base(base: int, levers: int) -> None:
    """Refuse a base sample too small for Sobol' indices, or not a power of two (the sequence's balance needs one)."""
    if levers < 2:
        raise ConfigError("sweep.space", f"search=sobol apportions an outcome's variance among levers, and has "
                          f"{levers} lever{'s' * (levers != 1)} with a range; give two or more as "
                          "{uniform|loguniform|randint: [lo, hi]}")
    if base < MIN_BASE or base & (base - 1):
        lower = max(MIN_BASE, 1 << max(0, base.bit_length() - 1))
        fits = sorted({lower, max(MIN_BASE, 1 << base.bit_length())})
        raise ConfigError("sweep.num_samples", f"search=sobol takes N, the design's base sample, a power of two >= "
                          f"{MIN_BASE} (the design runs N x (levers + 2) points), got {base}; use "
                          + " or ".join(str(f) for f in fits))


def scale(kind: str, low: float, high: float, u: float) -> float | int:
    """A unit-cube coordinate ``u`` in [0, 1) as a lever value in [low, high]."""
    if kind == "uniform":
        return float(low + u * (high - low))
    if kind == "loguniform":
        return float(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
    return int(min(int(high), int(low) + math.floor(u * (int(high) - int(low) + 1))))  # randint: both ends included


def sobol_design(levers: Sequence[Any], base: int, seed: int) -> list[dict[str, Any]]:
    """The design's points in Saltelli's order, each ``{design_row: i, lever key: value, ...}``.

    ``levers`` are :class:`sim.sweep.space.Dimension` s (key, kind, (lo, hi)); the same
    levers, base and seed give the same points.
    """
    from SALib.sample import sobol

    problem = {"num_vars": len(levers), "names": [d.key for d in levers], "bounds": [[0.0, 1.0]] * len(levers)}
    unit = sobol.sample(problem, base, calc_second_order=False, scramble=True, seed=seed)
    return [{DESIGN_ROW: i, **{d.key: scale(d.kind, *d.values, float(u)) for d, u in zip(levers, row)}}
            for i, row in enumerate(unit)]


def record(levers: Sequence[Any], base: int, seed: int, crossed: dict[str, list], seeds: Sequence[int]) -> dict:
    """What ``design.json`` holds: the method, N, the levers with their ranges, what is crossed, and the seeds."""
    return {"method": "sobol", "base": base, "second_order": False, "seed": seed, "points": points(base, len(levers)),
            "levers": [{"key": d.key, "kind": d.kind, "low": d.values[0], "high": d.values[1]} for d in levers],
            "crossed": crossed, "seeds": list(seeds)}
