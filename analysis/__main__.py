"""Command line: ``python -m analysis report RUN_DIR... [--out DIR]``, ``contribution ...``, ``stability RUN_DIR...``,
``sensitivity SWEEP_DIR`` and ``page RUN_DIR --command CMD [--untuned DIR] [--out FILE]`` (a Markdown results
page for the docs site).

Bad input (a missing directory, one without metrics.parquet) ends with one line on
stderr and exit status 2, as argparse does for bad arguments.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from analysis.runs import RunDirError, find_run_dirs
from sim.core.types import ConfigError


def report(args: argparse.Namespace) -> int:
    """Build the HTML report of the given run directories and print its path."""
    from analysis.report import build_report  # pandas/matplotlib only when a report is asked for

    find_run_dirs(args.run_dirs)  # fail on bad input before any work
    out = args.out if args.out is not None else Path(args.run_dirs[0])
    path = build_report(args.run_dirs, out, include_incomplete=args.include_incomplete, target=args.target)
    print(path)
    return 0


def contribution(args: argparse.Namespace) -> int:
    """Hand over to ``python -m sim.contribution``: contribution values re-run the scenario on coalitions, a
    simulation, and analysis only reads results."""
    return subprocess.call([sys.executable, "-m", "sim.contribution", *args.rest])


def stability(args: argparse.Namespace) -> int:
    """Print how far each institution's reported accuracy moves over the last rounds under each selection rule."""
    from analysis.metrics import GLOBAL, selection_stability
    from sim.core.results import read_table

    dirs = find_run_dirs(args.run_dirs)
    table = selection_stability(read_table("metrics", dirs), window=args.window)
    table = table[table["institution"] != GLOBAL]
    per_inst = table.groupby(["scheme", "institution"], sort=False)[["best_val_range", "last_range"]].max()
    print(f"largest move of each institution's reported test accuracy (points) had the run ended in any of its last "
          f"{args.window} rounds, over {table['seed'].nunique()} seed(s):")
    print(per_inst.reset_index().to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"worst: best_val {per_inst['best_val_range'].max():.2f} points, last {per_inst['last_range'].max():.2f} points")
    return 0


def sensitivity(args: argparse.Namespace) -> int:
    """Print the Sobol' indices of a sensitivity sweep's levers per scheme and outcome; write them and the maps."""
    from analysis.sensitivity import write

    print(write(args.sweep_dir, args.out if args.out is not None else Path(args.sweep_dir) / "sensitivity", args.target))
    return 0


def page(args: argparse.Namespace) -> int:
    """Write the Markdown results page of a compare's run directory (for the docs site) and print its path."""
    from analysis.results_page import results_page, write_page

    for d in [args.run_dir, *([args.untuned] if args.untuned else [])]:
        find_run_dirs([d])  # fail on bad input before any work
    text = results_page(args.run_dir, args.command, args.untuned, args.note)
    if args.out is None:
        print(text)
        return 0
    write_page(args.out, text, args.title or "Results")
    print(args.out)
    return 0


def _accuracy(text: str) -> float:
    """A target accuracy for --target: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected an accuracy in (0, 1], e.g. 0.8, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m analysis``."""
    p = argparse.ArgumentParser(prog="python -m analysis", description="Analyse collabsim results.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="write report.html and tables/ for one or more run directories")
    r.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run, compare or sweep directory")
    r.add_argument("--out", type=Path, default=None, help="output directory (default: the first RUN_DIR)")
    r.add_argument("--include-incomplete", action="store_true", help="keep runs whose status.json is not complete")
    r.add_argument("--target", type=_accuracy, default=None, metavar="ACC",
                   help="accuracy (0-1] that time and cost to target are measured at (default: 95%% of the best reached)")
    r.set_defaults(func=report)
    c = sub.add_parser("contribution", add_help=False,  # its --help is sim.contribution's
                       help="Shapley and leave-one-out values by re-running coalitions on Ray (python -m sim.contribution)")
    c.add_argument("rest", nargs=argparse.REMAINDER, metavar="RUN_DIR [options]")
    c.set_defaults(func=contribution)
    s = sub.add_parser("stability", help="how much reported accuracies move over the last rounds, per selection rule")
    s.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run, compare or sweep directory")
    s.add_argument("--window", type=int, default=5, help="last rounds considered (default 5)")
    s.set_defaults(func=stability)
    v = sub.add_parser("sensitivity", help="Sobol' indices of a sensitivity sweep's levers, per scheme and outcome")
    v.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="a sweep made with search: sobol (sweep=sensitivity)")
    v.add_argument("--out", type=Path, default=None, help="where the tables and maps go (default: SWEEP_DIR/sensitivity)")
    v.add_argument("--target", type=_accuracy, default=None, metavar="ACC",
                   help="accuracy (0-1] money to target is measured at (default: 95%% of what each run ends with)")
    v.set_defaults(func=sensitivity)
    g = sub.add_parser("page", help="a Markdown results page (docs/results/) from a compare's run directory")
    g.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the compare's run directory")
    g.add_argument("--command", required=True, help="the command that produced RUN_DIR, shown on the page")
    g.add_argument("--untuned", type=Path, default=None, metavar="DIR",
                   help="the same compare at config settings: gains before and after tuning, gap to pooled closed")
    g.add_argument("--title", default=None, help="the title of a new page (an existing page keeps its own)")
    g.add_argument("--note", default=None, help="a paragraph under the command (how long it took, on what machine)")
    g.add_argument("--out", type=Path, default=None, help="write the page here, between its '<!-- measured: begin/end -->' markers if it has them (default: print it)")
    g.set_defaults(func=page)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the subcommand, turn bad input into one line on stderr and exit status 2."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except RunDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
