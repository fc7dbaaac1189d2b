"""Entry point of ``python -m sim.bench`` (see sim/bench/cli.py); exit status 1 when a workload failed."""

import sys

from sim.bench.cli import main

if __name__ == "__main__":
    report = main()
    sys.exit(1 if any(r["kind"] == "failed" for r in report["results"].values()) else 0)
