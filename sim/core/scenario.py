"""Turn the ``scenario`` config group into a validated, frozen :class:`Scenario`.

Three ways to say who collaborates: an explicit list of institutions (names, disciplines,
shares, skew, compute); ``num_institutions: N``, a generated population with Dirichlet
label skew and power-law data shares over round-robin disciplines; or the sites of the
user's own table (:func:`from_sites`: one institution per value of ``data.institution_column``,
shares from row counts), which ``from_data: auto`` picks whenever the data name such a column.

Behaviours (agents/behaviours.py): a row's ``behaviour`` and its settings, or for a generated
population ``behaviours: {free_rider: 0.1, sign_flip: 0.2}``, shares of the institutions
drawn from the seed's own stream. A misbehaving institution's spec is a :class:`BehavingSpec`,
which carries the settings; an honest one stays a plain :class:`InstitutionSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import numpy as np

from sim.core.schema import (BEHAVIOUR_KEYS, BEHAVIOUR_SETTINGS, BEHAVIOURS, DP_SETTINGS, INSTITUTION, PROBABILITY, SCENARIO,
                        check_group, check_value)
from sim.core.types import ConfigError, InstitutionSpec, Scenario

__all__ = ["BEHAVIOURS", "BehavingSpec", "build_scenario", "from_sites", "uses_sites"]
SHARE_TOLERANCE = 1e-3  # shares are typed by hand with two decimals; allow rounding slack
EVEN_PART = 0.5  # generated populations: fraction of the data spread evenly under the power law
FAULT_KEYS = ("availability", "failure_rate", "speed")  # scenario-level defaults that every institution may override
BEHAVIOUR_STREAM = 0xBE4A  # second element of the RNG key that picks which generated institutions misbehave


@dataclass(frozen=True)
class BehavingSpec(InstitutionSpec):
    """A misbehaving institution: its spec plus its behaviour's settings (agents/behaviours.py reads them)."""

    behaviour_noise: float = 0.0  # free_rider: std of Gaussian noise on the model it sends back (0: exactly as received)
    label_noise: float = 0.3  # noisy_labels: fraction of its training labels flipped to another class
    scale: float | None = None  # sign_flip sends global - scale*change, scaled global + scale*change; None: 1 / 10
    poison_fraction: float = 0.3  # data_poisoning: fraction of its training rows triggered and relabelled
    trigger_features: int = 4  # data_poisoning: leading input elements the trigger sets (digits: top-left pixels)
    trigger_value: float = 1.0  # data_poisoning: their value (digits' brightest pixel)
    target_label: int = 0  # data_poisoning: the label a triggered row is given


def build_scenario(cfg: Mapping[str, Any], seed: int) -> Scenario:
    """Validate the scenario config and build its frozen institution specs."""
    check_group("scenario", cfg, SCENARIO)
    name = str(cfg.get("name") or "scenario")
    faults = {k: cfg.get(k, getattr(InstitutionSpec, k)) for k in FAULT_KEYS}
    settings = {k: cfg[k] for k in BEHAVIOUR_SETTINGS if cfg.get(k) is not None}  # defaults for misbehaving rows
    n = cfg.get("num_institutions")
    if n is not None:
        scenario = _generated(cfg, name, n, seed, faults)
        return replace(scenario, institutions=tuple(_private(s, cfg, {}, "scenario") for s in scenario.institutions))
    if cfg.get("behaviours"):
        raise ConfigError("scenario.behaviours", "shares of behaviours apply to a generated population "
                          "(scenario.num_institutions=N); with a list, set behaviour on each institution row")
    rows = cfg.get("institutions") or []
    if not rows:
        raise ConfigError("scenario.institutions", "no institutions listed; list some or set scenario.num_institutions=N")
    specs = tuple(_private(_institution(i, row, faults, settings), cfg, row, f"scenario.institutions[{i}]")
                  for i, row in enumerate(rows))
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
    mode = check_value("scenario.from_data", cfg.get("from_data", False), SCENARIO["from_data"])
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
    if cfg.get("behaviours"):
        raise ConfigError("scenario.behaviours", "shares of behaviours apply to a generated population "
                          "(scenario.num_institutions=N), not to the sites of a table")
    total = sum(rows for _, _, rows in sites)
    faults = {k: float(cfg.get(k, getattr(InstitutionSpec, k))) for k in FAULT_KEYS}
    specs = tuple(
        InstitutionSpec(index=i, name=site, discipline=discipline, share=rows / total,
                        cpus=float(cfg.get("cpus", 0.25)), gpus=float(cfg.get("gpus", 0.0)), **faults)
        for i, (site, discipline, rows) in enumerate(sites)
    )
    _check_names(specs)
    return Scenario(name=name, institutions=tuple(_private(s, cfg, {}, "scenario") for s in specs))


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
    return Scenario(name=f"{name}-n{n}", institutions=_assign(specs, cfg, seed))


def _assign(specs: tuple[InstitutionSpec, ...], cfg: Mapping[str, Any], seed: int) -> tuple[InstitutionSpec, ...]:
    """Give ``scenario.behaviours``' shares of a generated population their behaviour, drawn from the seed's own stream.

    A share s of n institutions is round(s * n) of them (half up), at least one for any s > 0;
    behaviours take their institutions in the order of BEHAVIOURS from one seeded permutation.
    """
    shares = cfg.get("behaviours") or {}
    n = len(specs)
    counts = {}
    for b, share in shares.items():
        if b not in BEHAVIOURS or b == "honest":
            raise ConfigError(f"scenario.behaviours.{b}", f"unknown behaviour {b!r}; choose among "
                              f"{', '.join(x for x in BEHAVIOURS if x != 'honest')} (the rest are honest)")
        check_value(f"scenario.behaviours.{b}", share, PROBABILITY)
        counts[b] = max(1, int(np.floor(share * n + 0.5))) if share > 0 else 0
    if sum(counts.values()) > n:
        raise ConfigError("scenario.behaviours", f"asks for {sum(counts.values())} misbehaving institutions but the "
                          f"population has {n}; lower the shares (each positive share is at least one institution)")
    settings = {k: cfg[k] for k in BEHAVIOUR_SETTINGS if cfg.get(k) is not None}
    out, order, at = list(specs), np.random.default_rng([seed, BEHAVIOUR_STREAM]).permutation(n), 0
    for b in BEHAVIOURS:
        for j in order[at : at + counts.get(b, 0)]:
            out[j] = _behaving(out[j], b, settings, "scenario")
        at += counts.get(b, 0)
    return tuple(out)


def _behaving(spec: InstitutionSpec, behaviour: str, settings: Mapping[str, Any], key: str) -> InstitutionSpec:
    """``spec`` with ``behaviour`` and the settings that behaviour takes (an honest spec stays plain)."""
    if behaviour == "honest":
        return spec
    check_value(f"{key}.behaviour", behaviour, INSTITUTION["behaviour"])
    own = {k: settings[k] for k in BEHAVIOUR_KEYS[behaviour] if k in settings}
    for k, v in own.items():
        check_value(f"{key}.{k}", v, BEHAVIOUR_SETTINGS[k])
    base = {f.name: getattr(spec, f.name) for f in fields(InstitutionSpec)}
    numbers = {k: (int(v) if k in ("trigger_features", "target_label") else float(v)) for k, v in own.items()}
    return BehavingSpec(**(base | {"behaviour": behaviour}), **numbers)


def _institution(i: int, row: Any, faults: dict[str, float], settings: Mapping[str, Any]) -> InstitutionSpec:
    """One validated institution from its config row (scenario-level fault rates and behaviour settings unless it sets its own)."""
    key = f"scenario.institutions[{i}]"
    check_group(key, row, INSTITUTION)
    behaviour = row.get("behaviour", "honest")
    for k in BEHAVIOUR_SETTINGS:
        if k in row and k not in BEHAVIOUR_KEYS.get(behaviour, ()):
            takes = [b for b, ks in BEHAVIOUR_KEYS.items() if k in ks]
            raise ConfigError(f"{key}.{k}", f"is a setting of behaviour {' / '.join(takes)}, but this institution is "
                              f"{behaviour}; remove it or set behaviour: {takes[0]}")
    if not row.get("name"):
        raise ConfigError(f"{key}.name", "every institution needs a name")
    check_value(f"{key}.share", row.get("share"), INSTITUTION["share"])
    label_skew = row.get("label_skew")
    number = lambda k, default: float(row.get(k, default))  # noqa: E731 - the schema has checked every value
    spec = InstitutionSpec(
        index=i,
        name=row["name"],
        discipline=row.get("discipline") or "general",
        share=float(row["share"]),
        label_skew=None if label_skew is None else float(label_skew),
        feature_skew=number("feature_skew", 0.0),
        cpus=number("cpus", 1.0),
        gpus=number("gpus", 0.0),
        bandwidth_mbps=number("bandwidth_mbps", 100.0),
        latency_s=number("latency_s", 0.05),
        **{k: number(k, v) for k, v in faults.items()},
        model=row.get("model"),
    )
    return _behaving(spec, behaviour, {**settings, **{k: row[k] for k in BEHAVIOUR_SETTINGS if k in row}}, key)


def _private(spec: InstitutionSpec, cfg: Mapping[str, Any], row: Mapping[str, Any], key: str) -> InstitutionSpec:
    """``spec`` with its DP-SGD settings: the row's own, else the scenario's defaults (a spec without any stays as is)."""
    own = {k: (row[k], key) if row.get(k) is not None else (cfg.get(k), "scenario") for k in DP_SETTINGS}
    if all(v is None for v, _ in own.values()):
        return spec
    (noise, at), (clip, _) = own["dp_noise_multiplier"], own["dp_clip_norm"]
    if noise is None:
        raise ConfigError(f"{key}.dp_noise_multiplier",
                          "DP-SGD settings are given without a noise multiplier; set it (> 0) or remove them")
    if clip is None:
        raise ConfigError(f"{at}.dp_clip_norm", "a noise multiplier needs a clipping norm; set dp_clip_norm (> 0)")
    delta, _ = own["dp_delta"]
    return replace(spec, dp_noise_multiplier=float(noise), dp_clip_norm=float(clip),
                   dp_delta=spec.dp_delta if delta is None else float(delta))


def _check_names(specs: tuple[InstitutionSpec, ...]) -> None:
    """Names identify institutions in every table, so they must be unique and not 'global'."""
    seen: set[str] = set()
    for s in specs:
        if s.name in seen or s.name == "global":
            raise ConfigError(f"scenario.institutions[{s.index}].name", f"name {s.name!r} is reserved or used twice")
        seen.add(s.name)
