"""The wrapper base: a scheme around another, passing every call it does not change to ``inner``."""

from __future__ import annotations

from typing import Any, ClassVar

from sim.core.types import ConfigError


class Wrapper:
    """A feature around a scheme (``inner``): every protocol call it does not define goes to ``inner`` unchanged."""

    group: ClassVar[str] = ""  # its config group (aggregator, secagg, privacy, compression)
    option: ClassVar[str] = ""  # its option in that group, for messages (e.g. krum)

    def __init__(self, inner: Any):
        self.around(inner)

    def around(self, inner: Any) -> "Wrapper":
        """Wrap ``inner`` (raises ConfigError, naming both, when the two cannot work together); returns self."""
        self.inner = inner
        self.fit(inner)
        return self

    def fit(self, inner: Any) -> None:
        """Refuse an ``inner`` this feature cannot wrap (subclasses say which); most take any scheme."""

    @property
    def label(self) -> str:
        """How the config names this layer: ``group=option``, or ``scheme=NAME`` for a preset registered as a scheme."""
        preset = vars(type(self)).get("name")
        return f"scheme={preset}" if preset else f"{self.group}={self.option}"

    def refuse(self, why: str, fix: str) -> ConfigError:
        """The one-line refusal of this wrapper around its inner scheme: names both, says why and the fix."""
        return ConfigError(self.label.partition("=")[0], f"{self.label} cannot wrap {describe(self.inner)}: {why}; {fix}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "inner":  # copy and pickle probe dunders before inner exists
            raise AttributeError(name)
        return getattr(self.inner, name)


def describe(scheme: Any) -> str:
    """``scheme fedprox``, or ``scheme fedprox with aggregator=krum`` for a wrapped one."""
    return f"scheme {core(scheme).name}" + "".join(f" with {w.label}" for w in reversed(layers(scheme)))


def core(scheme: Any) -> Any:
    """The scheme inside every wrapper."""
    while isinstance(scheme, Wrapper):
        scheme = scheme.inner
    return scheme


def layers(scheme: Any) -> list[Wrapper]:
    """The wrappers around the core, outermost first."""
    out = []
    while isinstance(scheme, Wrapper):
        out.append(scheme)
        scheme = scheme.inner
    return out


def averaging(scheme: Any) -> bool:
    """Whether ``scheme`` merges by ``step(aggregate(updates))`` (FedAvg and the variants that keep its merge)."""
    return bool(getattr(scheme, "averages", False)) and not getattr(scheme, "asynchronous", False)
