"""How the benchmark measures: peak memory of a process tree, and a command's timeline from its progress lines.

Peak RSS is the largest sum, over one sampling instant, of the resident set of a root
process and all its descendants (Ray's GCS, raylet and workers included), sampled every
``PERIOD_S`` from a thread. Pages shared between processes (Ray's object store, torch's
libraries) count once per process that maps them, so the sum is an upper bound.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

PERIOD_S = 0.2  # sampling period: short enough to catch a round's peak, cheap enough not to slow a 2-core box
ROUND_LINE = re.compile(r"\] round (\d+)/(\d+) ")  # the engine's progress line: "[scheme] round r/R ..."
TAIL_LINES = 30  # output lines kept to explain a failed command


class PeakRSS:
    """Context manager: the peak summed RSS (MiB) of ``pid`` and its descendants while it is open."""

    def __init__(self, pid: int | None = None):
        self.pid = os.getpid() if pid is None else pid
        self.peak_mib = math.nan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        try:
            import psutil  # the `bench` extra; without it peaks are reported as NaN
        except ImportError:
            return self
        self._thread = threading.Thread(target=self._watch, args=(psutil,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self, psutil) -> None:
        """Sample until stopped; a process that vanished mid-sample simply counts no more."""
        while True:
            total = 0
            try:
                root = psutil.Process(self.pid)
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                pass
            if total:
                mib = total / 2**20
                self.peak_mib = mib if math.isnan(self.peak_mib) else max(self.peak_mib, mib)
            if self._stop.wait(PERIOD_S):
                return


@dataclass
class CommandRun:
    """One command's wall time, when each progress line arrived (seconds after launch), and its peak RSS."""

    argv: list[str]
    total_s: float
    returncode: int
    peak_rss_mib: float
    round_at: dict[int, float] = field(default_factory=dict)  # round -> arrival of its line (last run's, if several)
    rounds: int = 0
    round_lines: int = 0  # progress lines seen, over every run the command made
    tail: list[str] = field(default_factory=list)
    driver_mib_at: dict[int, float] = field(default_factory=dict)  # round -> the command's own RSS when its line came

    def driver_growth(self) -> dict[str, float]:
        """The command process's own RSS (MiB) at the first third of its rounds and at its second-last round, and the
        growth between them per 10 rounds: whether the driver's memory grows with rounds."""
        rounds = sorted(r for r in self.driver_mib_at if r < max(self.driver_mib_at, default=0))
        if len(rounds) < 3:
            return {"driver_mib": math.nan, "driver_growth_mib_per_10_rounds": math.nan}
        a, b = rounds[len(rounds) // 3], rounds[-1]
        growth = (self.driver_mib_at[b] - self.driver_mib_at[a]) / (b - a) * 10
        return {"driver_mib": self.driver_mib_at[b], "driver_growth_mib_per_10_rounds": growth}

    def timeline(self) -> dict[str, float]:
        """Start-up, round-loop and per-round seconds read from the progress lines (see :func:`timeline`)."""
        return timeline(self.round_at, self.total_s)


def timeline(round_at: dict[int, float], total_s: float) -> dict[str, float]:
    """Per-round = (t_{R-1} - t_1)/(R - 2), the steady rounds between the first and the last progress lines.

    Round 1's own line also carries round 0's scoring and any first-round warm-up, and the
    last round scores every institution, so the rounds between them set the pace (with only
    two lines, (t_R - t_1)). Start-up is launch to the estimated start of round 1
    (t_1 - per-round); the round loop runs from there to the last line, every round
    included; what follows the last line (writing tables, shutting actors down) is
    ``teardown``. With fewer than two lines only the total is known.
    """
    if len(round_at) < 2:
        return {"startup_s": math.nan, "loop_s": math.nan, "round_s": math.nan, "teardown_s": math.nan}
    first, last = min(round_at), max(round_at)
    # The last round may score everybody (engine.eval_scope=cohort scores only the cohort before it): the steady
    # pace comes from the rounds between the first and the last when there are any; the loop keeps every round.
    steady = max((r for r in round_at if r < last), default=first) if last - first >= 2 else last
    per_round = (round_at[steady] - round_at[first]) / (steady - first)
    startup = round_at[first] - per_round
    return {"startup_s": startup, "loop_s": round_at[last] - startup, "round_s": per_round,
            "teardown_s": total_s - round_at[last]}


def _rss_mib(pid: int) -> float:
    """One process's resident set (MiB), NaN without psutil or once it is gone."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - no psutil, or the process ended
        return math.nan


def run_command(argv: list[str], *, label: str = "", timeout_s: float = 3600.0) -> CommandRun:
    """Run ``argv`` (a python -m command) with output piped, stamping each progress line as it arrives."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    out = CommandRun(argv=argv, total_s=math.nan, returncode=-1, peak_rss_mib=math.nan)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    with PeakRSS(proc.pid) as rss:
        killer = threading.Timer(timeout_s, proc.kill)  # a hung command must not hang the benchmark
        killer.start()
        try:
            for line in proc.stdout:
                now = time.perf_counter() - t0
                out.tail = (out.tail + [line.rstrip()])[-TAIL_LINES:]
                if m := ROUND_LINE.search(line):
                    r, out.rounds = int(m.group(1)), int(m.group(2))
                    if r == 1:  # a command running several simulations: keep the last one's timeline
                        out.round_at, out.driver_mib_at = {}, {}
                    out.round_at[r] = now
                    out.round_lines += 1
                    out.driver_mib_at[r] = _rss_mib(proc.pid)
                    if label and (r in (1, out.rounds) or r % 10 == 0):
                        print(f"  {label}: round {r}/{out.rounds} at {now:.1f}s", file=sys.stderr, flush=True)
            out.returncode = proc.wait()
        finally:
            killer.cancel()
    out.total_s, out.peak_rss_mib = time.perf_counter() - t0, rss.peak_mib
    return out
