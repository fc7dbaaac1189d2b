"""Command-line guard: check the command's config the way Hydra will compose it, before anything runs.

Hydra reports a bad override as a multi-line message with a hint about stack traces.
Users get one line naming the key and the fix instead, and exit status 2, before Ray
or any actor starts. Sweep overrides (``-m scheme=a,b``) are checked value by value.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Callable, Iterable

from omegaconf import DictConfig

from sim.types import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PASSTHROUGH = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion", "-sc", "--version"}


def fail(message: str) -> None:
    """Print one error line and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def group_options(group: str) -> list[str]:
    """Config names available in a group folder of conf/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def guard(config_name: str, argv: list[str], check: Callable[[DictConfig], None]) -> None:
    """Compose ``config_name`` with the command's overrides and run ``check``; one line and exit 2 on error."""
    if any(a.split("=")[0] in PASSTHROUGH for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra"))]
    try:
        for combo in _combinations(overrides):
            check(compose(config_name, combo))
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - any composition error becomes one line
        fail(explain(e))


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose a config from conf/ exactly as the command line would, outside @hydra.main."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def _combinations(overrides: list[str]) -> Iterable[list[str]]:
    """The first value of every sweep, then each other value of each sweep on its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values] or [f"{key}="])
    base = [c[0] for c in choices]
    yield base
    for i, c in enumerate(choices):
        for alt in c[1:]:
            yield base[:i] + [alt] + base[i + 1:]


def explain(e: BaseException) -> str:
    """One line from Hydra/OmegaConf's error: which key, what is wrong, how to fix it."""
    text = str(e)
    if m := re.search(r"Could not find '([\w/]+)/([^']+)'", text):
        group, option = m.groups()
        return f"{group}: unknown option {option!r}; choose one of {', '.join(group_options(group))}"
    if m := re.search(r"Could not (?:override|append to) '([^']+)'", text):
        key = m.group(1)
        return f"{key}: unknown config key{_suggest(key)} (see `python -m sim --cfg job` for all keys)"
    if m := re.search(r"Key '([^']+)' is not in struct", text):
        return f"{m.group(1)}: unknown config key (see `python -m sim --cfg job` for all keys)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _suggest(key: str) -> str:
    """'; did you mean X?' for a misspelt dotted key, from the composed default config."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(compose("config", []), resolve=False)
    except Exception:  # noqa: BLE001 - suggestions are best-effort
        return ""
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in filter(None, parent.split(".")):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    known = list(node) if isinstance(node, dict) else []
    close = difflib.get_close_matches(leaf, known, n=1)
    return f"; did you mean {'.'.join(filter(None, [parent, close[0]]))}?" if close else ""
