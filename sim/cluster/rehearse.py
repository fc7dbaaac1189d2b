"""Cluster scale rehearsed on one machine: a node lost mid-run, the run stopped or finished, the resume exact.

``python -m sim.cluster.rehearse`` starts a warm local cluster of three ``ray start`` nodes on this
machine (a head and two nodes, one CPU each unless told otherwise, token authentication on, each its
own ports and Ray folder), runs a many-institution Synthetic(1,1) population (the benchmark's scale
workload: 10,000 institutions, a cohort of 100) with its pooled hosts spread over the nodes, and kills
the last node's raylet once round ``--kill-at`` is done. The same command runs uninterrupted first, on
the three nodes. It checks that
the interrupted run either finishes on the nodes that remain or stops with the one-line
``python -m sim resume=DIR`` command and no unhandled Ray error print; runs that resume command (on
the two nodes left); and compares the two ``metrics.parquet`` files. Everything it started is stopped at the
end. The warm cluster it uses is the one ``python -m sim.cluster`` manages, so none may be up before.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from agents.runtime import cluster, nodes
from sim.bench.workloads import population

RESUME = re.compile(r"continue with: (python -m sim resume=\S+)")
ROUND = re.compile(r"\] round (\d+)/(\d+) ")
NOISE = ("Unhandled error", "Traceback (most recent call last)", "RayActorError", "ActorDiedError", "[state-dump]",
         "- objects errored")
"""What must not reach the user when a node is lost: unhandled-error prints, raw tracebacks, a raylet's log dump."""


@dataclass
class Outcome:
    """What a rehearsal saw: how the interrupted run ended, whether the resumed numbers equal an uninterrupted run's."""

    ended: str = ""  # "finished" on the remaining nodes, or "stopped" with the resume command
    resume_command: str = ""
    noise: list[str] = field(default_factory=list)  # lines of Ray error output the user saw
    identical: bool | None = None  # metrics.parquet of resumed (or finished) == uninterrupted
    seconds: dict[str, float] = field(default_factory=dict)
    last_error: str = ""

    @property
    def passed(self) -> bool:
        """The run ended in one of the two allowed ways, said nothing raw, its numbers equal the uninterrupted run's."""
        return self.ended in ("finished", "stopped") and not self.noise and bool(self.identical)


def workload(institutions: int, cohort: int, rounds: int) -> list[str]:
    """The overrides of the rehearsed run: the scale workload, pooled hosts, a checkpoint every round."""
    return [*population(institutions, cohort, rounds), "placement=pooled", "checkpoint_every=1"]


def run(argv: list[str], kill_at: int | None = None, node: str | None = None) -> tuple[int, list[str], float]:
    """Run a command, streaming its output; with ``kill_at``, kill ``node``'s raylet once that round's line is out."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        print(f"  | {line.rstrip()}", flush=True)
        m = ROUND.search(line)
        if kill_at is not None and m and int(m.group(1)) == kill_at:
            pid = nodes.kill_raylet(node)
            print(f"[rehearse] round {kill_at} done: killed the raylet (pid {pid}) of node {node}", flush=True)
            kill_at = None
    return proc.wait(), lines, time.perf_counter() - t0


def rehearse(institutions: int = 10_000, cohort: int = 100, rounds: int = 6, kill_at: int = 2,
             node_cpus: float = 1.0, workdir: Path | None = None) -> Outcome:
    """The whole rehearsal (see the module docstring); the warm cluster it starts is stopped whatever happens."""
    if cluster.status()["state"] != "down":
        raise RuntimeError("a warm local cluster is up: python -m sim.cluster down first (the rehearsal makes its own)")
    work = Path(workdir or tempfile.mkdtemp(prefix="collabsim-rehearse-"))
    overrides = workload(institutions, cohort, rounds)
    command = [sys.executable, "-m", "sim", *overrides]
    out = Outcome()
    try:
        t0 = time.perf_counter()
        cluster.up(num_cpus=node_cpus)
        doomed = [cluster.add_node(node_cpus) for _ in range(2)][-1]
        out.seconds["cluster_up"] = time.perf_counter() - t0
        print(f"[rehearse] three nodes of {node_cpus:g} CPU up in {out.seconds['cluster_up']:.1f}s; uninterrupted "
              f"run first: {' '.join(command[1:])}", flush=True)
        code, _, out.seconds["uninterrupted"] = run([*command, f"hydra.run.dir={work / 'reference'}"])
        if code != 0:
            raise RuntimeError(f"the uninterrupted run failed (exit {code}); see its output above")
        print(f"[rehearse] the same run again; the raylet of {doomed} is killed after round {kill_at}", flush=True)
        code, lines, out.seconds["interrupted"] = run([*command, f"hydra.run.dir={work / 'run'}"], kill_at, doomed)
        out.noise = [ln for ln in lines if any(n in ln for n in NOISE)]
        errors = [ln for ln in lines if ln.startswith("error:")]
        out.last_error = errors[-1] if errors else ""
        found = RESUME.search(out.last_error)
        if code == 0:
            out.ended = "finished"
        elif found:
            out.ended, out.resume_command = "stopped", found.group(1)
            print(f"[rehearse] stopped as it should: {out.last_error}; resuming on the nodes left", flush=True)
            code, _, out.seconds["resumed"] = run([sys.executable, *found.group(1).split()[1:]])  # as printed
            if code != 0:
                out.ended = "resume failed"
        else:
            out.ended = f"failed (exit {code}) without the resume command"
        if out.ended in ("finished", "stopped"):
            out.identical = pd.read_parquet(work / "run" / "metrics.parquet").equals(
                pd.read_parquet(work / "reference" / "metrics.parquet"))
    finally:
        cluster.down()
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse the options, rehearse, print the verdict; exit status 1 when the rehearsal failed."""
    parser = argparse.ArgumentParser(prog="python -m sim.cluster.rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--institutions", type=int, default=10_000)
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=2, help="kill a node's raylet once this round is done")
    parser.add_argument("--node-cpus", type=float, default=1.0, help="CPUs of each of the three nodes")
    parser.add_argument("--workdir", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    args = parser.parse_args(argv)
    out = rehearse(args.institutions, args.cohort, args.rounds, args.kill_at, args.node_cpus, args.workdir)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in out.seconds.items())
    print(f"[rehearse] node lost after round {args.kill_at}: the run {out.ended}"
          f"{' (' + out.resume_command + ')' if out.resume_command else ''}; Ray error lines shown: {len(out.noise)}; "
          f"metrics.parquet identical to an uninterrupted run: {out.identical}; {times}")
    raise SystemExit(0 if out.passed else 1)


if __name__ == "__main__":
    main()
