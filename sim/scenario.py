"""Turn the ``scenario`` config group into a validated, frozen :class:`Scenario`.

Three ways to say who collaborates: an explicit list of institutions (names, disciplines,
shares, skew, compute); ``num_institutions: N``, a generated population with Dirichlet
label skew and power-law data shares over round-robin disciplines; or the sites of the
user's own table (:func:`from_sites`: one institution per value of ``data.institution_column``,
shares from row counts), which ``from_data: auto`` picks whenever the data name such a column.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sim.schema import BEHAVIOURS, INSTITUTION, SCENARIO, check_group, check_value
from sim.types import ConfigError, InstitutionSpec, Scenario

__all__ = ["BEHAVIOURS", "build_scenario", "from_sites", "uses_sites"]
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


def uses_sites(cfg: Mapping[str, Any], data: Mapping[str, Any]) -> bool:
    """Whether the scenario is the data's own sites: ``from_data`` is true, or ``auto`` and the data name a site column.

    ``auto`` (the built-in default scenario) applies to ``data=table`` with ``institution_column``
    set and to ``data=text`` with its natural partition, unless ``num_institutions`` asks for a
    generated population. A scenario file of one's own (no ``from_data`` key) keeps its list.
    """
    mode = cfg.get("from_data", False)
    if mode not in (True, False, "auto"):
        raise ConfigError("scenario.from_data", f"expected true, false or auto, got {mode!r}")
    if mode is False or cfg.get("num_institutions") is not None:
        return False
    column = data.get("institution_column", "institution" if data.get("name") == "text" else None)
    sited = data.get("name") in ("table", "text") and column is not None \
        and (data.get("name") == "table" or data.get("partition", "natural") == "natural")
    if mode is True and not sited:
        raise ConfigError("scenario.from_data", "the scenario can only come from data=table or data=text with "
                          "data.institution_column naming each row's site")
    return sited


def from_sites(cfg: Mapping[str, Any], name: str, sites: list[tuple[str, str, int]]) -> Scenario:
    """One institution per site (name, discipline, rows): shares from row counts, compute from the scenario's defaults."""
    check_group("scenario", cfg, SCENARIO)
    total = sum(rows for _, _, rows in sites)
    faults = {k: float(cfg.get(k, getattr(InstitutionSpec, k))) for k in FAULT_KEYS}
    specs = tuple(
        InstitutionSpec(index=i, name=site, discipline=discipline, share=rows / total,
                        cpus=float(cfg.get("cpus", 0.25)), gpus=float(cfg.get("gpus", 0.0)), **faults)
        for i, (site, discipline, rows) in enumerate(sites)
    )
    _check_names(specs)
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
