"""``python -m sim.cluster up | down | status``: keep a warm local Ray cluster up between commands."""

from __future__ import annotations

import argparse

from agents.runtime import cluster


def describe(state: dict) -> str:
    """What ``status`` prints: one line, then where the cluster lives."""
    if state["state"] == "down":
        return "down: no warm local cluster (python -m sim.cluster up starts one)"
    if state["state"] == "stale":
        return (f"stale: the cluster recorded at {state['address']} does not answer "
                "(python -m sim.cluster down clears what is left of it)")
    code = "" if state["code"] == "current" else "; its workers run older code: down and up again to refresh them"
    return (f"up: {state['address']}, {state['cpus']:g} CPUs on the head, {state['nodes']} node(s), "
            f"{state['warm_workers']} warm worker(s) with torch loaded{code}\n"
            f"  Ray folder {state['temp_dir']}; commands with no cluster.address join it")


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(prog="python -m sim.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("up", help="start the warm local cluster (kept if already up)")
    start.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: every core)")
    start.add_argument("--num-gpus", type=int, default=None, help="GPUs Ray may use (default: what it finds)")
    sub.add_parser("down", help="stop it (its processes, by their ids)")
    sub.add_parser("status", help="say what is up")
    args = parser.parse_args(argv)
    if args.action == "up":
        print(describe(cluster.up(args.num_cpus, args.num_gpus)))
    elif args.action == "down":
        ended = cluster.down()
        print(f"down: stopped {ended} Ray process(es)" if ended else "down: nothing was running")
    else:
        print(describe(cluster.status()))


if __name__ == "__main__":
    main()
