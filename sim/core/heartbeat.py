"""No silence over ten seconds: a run says what it is doing when a step takes long.

Loading a foundation model into every actor, tokenising a corpus or scoring the first model
can take a minute on a laptop, and a terminal that shows nothing for that long looks hung.
The engine names each step as it starts (:meth:`Heartbeat.phase`, silently, so a quick run
prints nothing extra); a background thread prints ``still <step> (N s)`` (or ``now <step>``
for a step begun within the silence) whenever nothing has been printed for ``every`` seconds.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

__all__ = ["Heartbeat"]

log = logging.getLogger("collabsim")


class Heartbeat:
    """``with Heartbeat("[fedavg]") as beat: beat.phase("building the data") ...`` (or ``start()`` … ``stop()``);
    ``beat.touch()`` after printing something of one's own."""

    def __init__(self, label: str, every: float = 10.0) -> None:
        self.label, self.every = label, every
        self._what, self._began = "starting", time.monotonic()
        self._quiet_since = self._began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="collabsim-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Begin watching; returns itself."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def phase(self, what: str) -> None:
        """The step the run is in now, in words ('loading the model into 8 actors'). Silent: quick steps print nothing,
        and naming a step does not restart the silence clock (only printing does)."""
        self._what, self._began = what, time.monotonic()

    def touch(self) -> None:
        """Something was just printed: the silence starts again from now."""
        self._quiet_since = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 4)):
            now = time.monotonic()
            if now - self._quiet_since >= self.every:
                took = now - self._began
                line = ("%s %s %s (%.0f s)", self.label, "still" if took >= self.every else "now", self._what, took)
                if log.hasHandlers():
                    log.info(*line)
                else:  # before the command's logging is set up (its data built early, sim.engine.start_early)
                    print(line[0] % line[1:], file=sys.stderr, flush=True)
                self._quiet_since = now
