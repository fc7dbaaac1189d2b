"""What a run shows while it runs from Python: one progress bar, and log lines only at the level asked for.

The commands print a line per round (Hydra's logging at INFO). In a notebook that is pages of
text, so the API shows a ``tqdm.auto`` bar instead (a widget in Jupyter, text in a terminal) and
passes on log records of the ``collabsim``, ``sim`` and ``agents`` loggers at ``log_level`` and
above (``"INFO"`` gives the command's round lines). Each run directory also gets the INFO log
in ``collabsim.log``, as a command's run directory gets Hydra's ``<job>.log``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Iterator

LOGGERS = ("collabsim", "sim", "agents")
LOG_FILE = "collabsim.log"
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job-logging format


def level_of(log_level: str | int) -> int:
    """A logging level from a name (``"info"``, ``"WARNING"``) or a number; ConfigError naming ``log_level``."""
    from sim.core.types import ConfigError

    if isinstance(log_level, bool) or not isinstance(log_level, (int, str)):
        raise ConfigError("log_level", f"expected a level such as 'INFO' or 'WARNING', got {log_level!r}")
    level = logging.getLevelName(log_level.upper()) if isinstance(log_level, str) else log_level
    if not isinstance(level, int):
        raise ConfigError("log_level", f"unknown level {log_level!r}; choose DEBUG, INFO, WARNING or ERROR")
    return level


@contextlib.contextmanager
def logging_to(level: int, log_file: Path | None = None) -> Iterator[None]:
    """Pass the engine's log records at ``level`` and above to stderr (and all INFO ones to ``log_file``) meanwhile."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(level)
    handlers[0].setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
        handlers[-1].setLevel(logging.INFO)
        handlers[-1].setFormatter(logging.Formatter(FORMAT))
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(min(level, logging.INFO if log_file is not None else level))
        logger.propagate = False  # a notebook's root handlers would print every record a second time
        for h in handlers:
            logger.addHandler(h)
    try:
        yield
    finally:
        for logger, old_level, propagate in saved:
            for h in handlers:
                logger.removeHandler(h)
            logger.setLevel(old_level)
            logger.propagate = propagate
        for h in handlers:
            h.close()


class Bar:
    """A tqdm.auto progress bar over the rounds of one or several runs (none when ``show`` is false)."""

    def __init__(self, total: int, description: str, show: bool = True):
        with warnings.catch_warnings():  # Jupyter without ipywidgets: tqdm warns, then draws the bar as text
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm

        self.done: dict[tuple, int] = {}
        self.bar = tqdm(total=total, desc=description, unit="round", disable=not show, leave=True, dynamic_ncols=True)

    def round(self, *key_and_round) -> None:
        """Note round ``r`` of the run ``key`` done: ``round(*key, r, summary)``, the engine's on_round with a key."""
        *key, r, summary = key_and_round
        self.done[tuple(key)] = r
        self.bar.n = sum(self.done.values())
        run = f"{key[0]} seed {key[1]}, " if len(key) == 2 else ""
        self.bar.set_postfix_str(f"{run}round {r}: global accuracy {summary['global_accuracy']:.3f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        """Leave the bar where it got to."""
        self.bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
