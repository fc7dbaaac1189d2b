"""The check every bad-input test makes: the config check stops with exactly one line and exit status 2."""

from __future__ import annotations

from typing import Sequence

import pytest

from sim.cli import guard
from sim.checks import load_spec


def refused(overrides: Sequence[str], capsys) -> str:
    """The error line ``python -m sim`` prints for ``overrides``, after asserting exit status 2 and a single line."""
    with pytest.raises(SystemExit) as exit_:
        guard("config", list(overrides), load_spec)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    return err
