"""Turn the ``scenario`` config group into a validated, frozen :class:`Scenario`.

Two ways to say who collaborates: an explicit list of institutions (names, disciplines,
shares, skew, compute), or ``num_institutions: N``, a generated population with
Dirichlet label skew and power-law data shares over round-robin disciplines.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sim.schema import BEHAVIOURS, INSTITUTION, SCENARIO, check_group, check_value
from sim.types import ConfigError, InstitutionSpec, Scenario

__all__ = ["BEHAVIOURS", "build_scenario"]
SHARE_TOLERANCE = 1e-3  # shares are typed by hand with two decimals; allow rounding slack
EVEN_PART = 0.5  # generated populations: fraction of the data spread evenly under the power law
FAULT_KEYS = ("availability", "failure_rate")  # scenario-level defaults that every institution may override


def build_scenario(cfg: Mapping[str, Any], seed: int) -> Scenario:
    """Validate the scenario config and build its frozen institution specs."""
    check_group("scenario", cfg, SCENARIO)
    name = str(cfg.get("name") or "scenario")
    faults = {k: cfg.get(k, getattr(InstitutionSpec, k)) for k in FAULT_KEYS}
    n = cfg.get("num_institutions")
    if n is not None:
        return _generated(cfg, name, n, seed, faults)
    rows = cfg.get("institutions") or []
    if not rows:
        raise ConfigError("scenario.institutions", "no institutions listed; list some or set scenario.num_institutions=N")
    specs = tuple(_institution(i, row, faults) for i, row in enumerate(rows))
    _check_names(specs)
    total = sum(s.share for s in specs)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ConfigError("scenario.institutions", f"shares add up to {total:.4g}, not 1; fix the shares so they sum to 1")
    return Scenario(name=name, institutions=specs)


def _generated(cfg: Mapping[str, Any], name: str, n: int, seed: int, faults: dict[str, float]) -> Scenario:
    """A population of ``n`` institutions: power-law shares, Dirichlet label skew, disciplines round-robin."""
    disciplines = list(cfg.get("disciplines") or ["general"])
    exponent = float(cfg.get("quantity_skew", 0.0))
    alpha = cfg.get("label_skew")
    rng = np.random.default_rng([seed, 0x5CE7])
    # Power-law shares: rank r gets weight r^-exponent, ranks shuffled so size is not tied to discipline.
    # Half the data is spread evenly so the smallest institution still has a usable shard at large N.
    weights = np.arange(1, n + 1, dtype=float) ** -exponent
    shares = rng.permutation(EVEN_PART / n + (1 - EVEN_PART) * weights / weights.sum())
    specs = tuple(
        InstitutionSpec(
            index=i,
            name=f"inst{i:0{len(str(n - 1))}d}",
            discipline=disciplines[i % len(disciplines)],
            share=float(shares[i]),
            label_skew=None if alpha is None else float(alpha),
            cpus=float(cfg.get("cpus", 0.25)),
            gpus=float(cfg.get("gpus", 0.0)),
            **{k: float(v) for k, v in faults.items()},
        )
        for i in range(n)
    )
    return Scenario(name=f"{name}-n{n}", institutions=specs)


def _institution(i: int, row: Any, faults: dict[str, float]) -> InstitutionSpec:
    """One validated institution from its config row (scenario-level fault rates unless it sets its own)."""
    key = f"scenario.institutions[{i}]"
    check_group(key, row, INSTITUTION)
    if not row.get("name"):
        raise ConfigError(f"{key}.name", "every institution needs a name")
    check_value(f"{key}.share", row.get("share"), INSTITUTION["share"])
    label_skew = row.get("label_skew")
    number = lambda k, default: float(row.get(k, default))  # noqa: E731 - the schema has checked every value
    return InstitutionSpec(
        index=i,
        name=row["name"],
        discipline=row.get("discipline") or "general",
        share=float(row["share"]),
        label_skew=None if label_skew is None else float(label_skew),
        feature_skew=number("feature_skew", 0.0),
        cpus=number("cpus", 1.0),
        gpus=number("gpus", 0.0),
        behaviour=row.get("behaviour", "honest"),
        bandwidth_mbps=number("bandwidth_mbps", 100.0),
        latency_s=number("latency_s", 0.05),
        **{k: number(k, v) for k, v in faults.items()},
    )


def _check_names(specs: tuple[InstitutionSpec, ...]) -> None:
    """Names identify institutions in every table, so they must be unique and not 'global'."""
    seen: set[str] = set()
    for s in specs:
        if s.name in seen or s.name == "global":
            raise ConfigError(f"scenario.institutions[{s.index}].name", f"name {s.name!r} is reserved or used twice")
        seen.add(s.name)
