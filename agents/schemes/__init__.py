"""Collaboration schemes: one small module per scheme, registered under its config name.

Importing this package imports every module in it, so the registry ``SCHEMES`` is full
and adding a scheme is one file here plus one yaml in ``conf/scheme/``.
"""

from __future__ import annotations

import importlib
import pkgutil

from agents.schemes.base import SCHEMES, Scheme, Trainer, register, sample_cohort

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["SCHEMES", "Scheme", "Trainer", "register", "sample_cohort"]
