"""Features that wrap a scheme: robust merge rules, secure aggregation, client-level privacy, compression.

Each is a :class:`~agents.wrappers.base.Wrapper` around another scheme (``inner``), as Flower's
DP strategies wrap a strategy, with a client half (what runs on the institution's host before
its update leaves: a :class:`~sim.core.types.LocalPlan`'s ``send`` steps) and a server half (what
the coordinator does before or instead of the inner scheme's mean). They are configured as
Hydra groups of their own (``aggregator=``, ``secagg=``, ``privacy=``, ``compression=``) and
:func:`wrap` composes them over any scheme in one fixed order, innermost first:

1. ``aggregator`` (:mod:`.robust`): a robust rule instead of the mean;
2. ``secagg`` (:mod:`.secagg`): the coordinator sees only the masked sum;
3. ``privacy`` (:mod:`.privacy`): clipped changes, Poisson-sampled cohorts, Gaussian noise;
4. ``compression`` (:mod:`.compression`): changes sent as top-k or int8, restored first.

A wrapper that cannot work with what it wraps (secure aggregation with a rule that must see
single updates, a robust rule around a scheme that does not average, ...) refuses in its
constructor with one :class:`~sim.core.types.ConfigError` naming both, which the pre-run checks
turn into one line before any actor starts. The maths each calls is pure and lives beside the
schemes (:mod:`agents.schemes.robust`, ``secagg``, ``privacy``, ``compression``).
"""

from __future__ import annotations

from typing import Any, Mapping

from agents.wrappers.base import Wrapper, layers
from agents.wrappers.base import core as innermost
from sim.core.schema import WRAPPERS as GROUPS  # the wrappers' config groups, innermost first: the order they compose in


def wrap(scheme: Any, wrappers: Mapping[str, Mapping[str, Any]]) -> Any:
    """``scheme`` wrapped by the configured features (group -> config with ``_target_``), in the order of GROUPS.

    A scheme that is itself a wrapped preset (``dp_fedavg`` is FedAvg under client-level privacy) is taken
    apart first, so its own layer takes its place in the order; the same group asked for twice is refused.
    """
    from hydra.utils import get_class, instantiate

    from sim.core.types import ConfigError

    own: dict[str, Wrapper] = {w.group: w for w in layers(scheme)}
    core = innermost(scheme)
    for group in GROUPS:
        cfg = wrappers.get(group)
        if group in own and cfg:
            asked = getattr(get_class(cfg["_target_"]), "option", "") or cfg.get("method", "")
            raise ConfigError(group, f"{group}={asked} cannot wrap scheme {own[group].name}: it already brings its own "
                              f"{group} layer; leave {group} at its default ({NONE[group]}) or use a scheme without it")
        if group in own:
            core = own[group].around(core)
        elif cfg:
            core = instantiate(dict(cfg), core)
    return core


def build(scheme: Mapping[str, Any], wrappers: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """The configured scheme (its group, with ``_target_``), wrapped by the configured features."""
    from hydra.utils import instantiate

    return wrap(instantiate(dict(scheme)), wrappers or {})


NONE = {"aggregator": "mean", "secagg": "none", "privacy": "none", "compression": "none"}
"""Each group's option that wraps nothing."""


__all__ = ["GROUPS", "NONE", "Wrapper", "build", "wrap"]
