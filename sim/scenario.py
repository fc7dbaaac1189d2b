"""Turn the ``scenario`` config group into a validated, frozen :class:`Scenario`.

Two ways to say who collaborates: an explicit list of institutions (names, disciplines,
shares, skew, compute), or ``num_institutions: N``, a generated population with
Dirichlet label skew and power-law data shares over round-robin disciplines.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from sim.types import ConfigError, InstitutionSpec, Scenario

INSTITUTION_KEYS = {
    "name", "discipline", "share", "label_skew", "feature_skew", "cpus", "gpus",
    "behaviour", "bandwidth_mbps", "latency_s",
}
BEHAVIOURS = ("honest",)
SHARE_TOLERANCE = 1e-3
EVEN_PART = 0.5  # generated populations: fraction of the data spread evenly under the power law  # shares are typed by hand with two decimals; allow rounding slack


def build_scenario(cfg: Mapping[str, Any], seed: int) -> Scenario:
    """Validate the scenario config and build its frozen institution specs."""
    name = str(cfg.get("name") or "scenario")
    n = cfg.get("num_institutions")
    if n is not None:
        return _generated(cfg, name, _positive_int("scenario.num_institutions", n), seed)
    rows = cfg.get("institutions") or []
    if not rows:
        raise ConfigError("scenario.institutions", "no institutions listed; list some or set scenario.num_institutions=N")
    specs = tuple(_institution(i, dict(row)) for i, row in enumerate(rows))
    _check_names(specs)
    total = sum(s.share for s in specs)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ConfigError("scenario.institutions", f"shares add up to {total:.4g}, not 1; fix the shares so they sum to 1")
    return Scenario(name=name, institutions=specs)


def _generated(cfg: Mapping[str, Any], name: str, n: int, seed: int) -> Scenario:
    """A population of ``n`` institutions: power-law shares, Dirichlet label skew, disciplines round-robin."""
    disciplines = list(cfg.get("disciplines") or ["general"])
    exponent = _non_negative("scenario.quantity_skew", cfg.get("quantity_skew", 0.0))
    alpha = cfg.get("label_skew")
    if alpha is not None:
        alpha = _positive("scenario.label_skew", alpha)
    cpus = _non_negative("scenario.cpus", cfg.get("cpus", 0.25))
    gpus = _non_negative("scenario.gpus", cfg.get("gpus", 0.0))
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
            label_skew=alpha,
            cpus=cpus,
            gpus=gpus,
        )
        for i in range(n)
    )
    return Scenario(name=f"{name}-n{n}", institutions=specs)


def _institution(i: int, row: dict) -> InstitutionSpec:
    """One validated institution from its config row."""
    key = f"scenario.institutions[{i}]"
    unknown = sorted(set(row) - INSTITUTION_KEYS)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key; an institution takes {', '.join(sorted(INSTITUTION_KEYS))}")
    if not row.get("name"):
        raise ConfigError(f"{key}.name", "every institution needs a name")
    behaviour = row.get("behaviour", "honest")
    if behaviour not in BEHAVIOURS:
        raise ConfigError(f"{key}.behaviour", f"unknown behaviour {behaviour!r}; choose one of {', '.join(BEHAVIOURS)}")
    label_skew = row.get("label_skew")
    return InstitutionSpec(
        index=i,
        name=str(row["name"]),
        discipline=str(row.get("discipline") or "general"),
        share=_positive(f"{key}.share", row.get("share")),
        label_skew=None if label_skew is None else _positive(f"{key}.label_skew", label_skew),
        feature_skew=_non_negative(f"{key}.feature_skew", row.get("feature_skew", 0.0)),
        cpus=_non_negative(f"{key}.cpus", row.get("cpus", 1.0)),
        gpus=_non_negative(f"{key}.gpus", row.get("gpus", 0.0)),
        behaviour=behaviour,
        bandwidth_mbps=_positive(f"{key}.bandwidth_mbps", row.get("bandwidth_mbps", 100.0)),
        latency_s=_non_negative(f"{key}.latency_s", row.get("latency_s", 0.05)),
    )


def _check_names(specs: tuple[InstitutionSpec, ...]) -> None:
    """Names identify institutions in every table, so they must be unique and not 'global'."""
    seen: set[str] = set()
    for s in specs:
        if s.name in seen or s.name == "global":
            raise ConfigError(f"scenario.institutions[{s.index}].name", f"name {s.name!r} is reserved or used twice")
        seen.add(s.name)


def _number(key: str, value: Any) -> float:
    """A finite float, or a ConfigError naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"expected a number, got {value!r}")
    return float(value)


def _positive(key: str, value: Any) -> float:
    """A number > 0."""
    v = _number(key, value)
    if v <= 0:
        raise ConfigError(key, f"must be > 0, got {value!r}")
    return v


def _non_negative(key: str, value: Any) -> float:
    """A number >= 0."""
    v = _number(key, value)
    if v < 0:
        raise ConfigError(key, f"must be >= 0, got {value!r}")
    return v


def _positive_int(key: str, value: Any) -> int:
    """An integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"expected a whole number >= 1, got {value!r}")
    return value
