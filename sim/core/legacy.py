"""Configs saved by older versions, read as what they meant, so their runs resume under the run ids they recorded.

A run directory's ``config.yaml`` is its config as it was composed then. Two things have moved
since, and are mapped here, after the run id is computed from the config as saved:

- model factories lived in ``sim.models`` before the layers were split; they are in ``sim.core.models``;
- robust merge rules, secure aggregation and compression were keys of the scheme (``merge``, ``trim``,
  ``byzantine``, ``krum_m``, ``clip_norm``, ``secure_aggregation``, ``compression``,
  ``compression_ratio``, ``error_feedback``) before they became wrappers with groups of their own.
"""

from __future__ import annotations

from typing import Any, Mapping

KEYS = ("merge", "trim", "byzantine", "krum_m", "secure_aggregation", "compression", "compression_ratio",
        "error_feedback")
"""Scheme keys of before the wrappers. ``clip_norm`` was the norm_clip rule's too, except under dp_fedavg, where it is
still the scheme's own (a dp_fedavg config never had ``merge``)."""
RULES = {"median": "Median", "trimmed_mean": "TrimmedMean", "krum": "Krum", "multi_krum": "MultiKrum",
         "norm_clip": "NormClip"}
"""The old ``scheme.merge`` values -> the wrapper classes of agents/wrappers/robust.py."""
RULE_KEYS = {"trimmed_mean": ("trim",), "krum": ("byzantine",), "multi_krum": ("byzantine", "krum_m"),
             "norm_clip": ("clip_norm",)}
"""The settings each old rule read."""
MOVED = ("sim" + ".models.", "sim.core.models.")  # spelt in two parts so no path rewrite takes it for a use
"""Where model factories lived before the layers were split, and where they are."""


def wrappers(scheme: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the scheme group without the keys of before the wrappers, the wrapper groups those keys meant)."""
    scheme = dict(scheme)
    old = {k: scheme.pop(k) for k in list(scheme) if k in KEYS}
    if "merge" in old and "clip_norm" in scheme:
        old["clip_norm"] = scheme.pop("clip_norm")
    out: dict[str, dict[str, Any]] = {}
    rule = old.get("merge", "mean")
    if rule != "mean":
        out["aggregator"] = {"_target_": f"agents.wrappers.robust.{RULES.get(rule, rule)}",
                             **{k: old[k] for k in RULE_KEYS.get(rule, ()) if k in old}}
    if old.get("secure_aggregation"):
        out["secagg"] = {"_target_": "agents.wrappers.secagg.SecureAggregation"}
    if old.get("compression", "none") != "none":
        out["compression"] = {"_target_": "agents.wrappers.compression.Compression", "method": old["compression"],
                              **({"ratio": old["compression_ratio"]} if "compression_ratio" in old else {}),
                              **({"error_feedback": old["error_feedback"]} if "error_feedback" in old else {})}
    return scheme, out


def model(group: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model group with a factory path of before the move (``sim.models.X``) pointing at its home now."""
    target = group.get("_target_")
    if isinstance(target, str) and target.startswith(MOVED[0]):
        return {**group, "_target_": MOVED[1] + target.removeprefix(MOVED[0])}
    return group
