"""Fill a results page's measured block from a real compare: ``python docs/results/make_page.py PAGE -- OVERRIDES...``.

Runs ``python -m sim.compare OVERRIDES... hydra.run.dir=DIR`` (or reads an existing compare with ``--run-dir DIR``),
then rewrites the part of PAGE between ``<!-- measured: begin -->`` and ``<!-- measured: end -->`` with the date, the
exact command, its wall time and machine, the summary table and each institution's gain, all read from the run's
``summary.csv`` and ``tables/gains.csv``. The prose around the block is the author's reading of it: rerun, read, and
update the prose where the numbers moved.

    python docs/results/make_page.py docs/results/digits-label-skew.md -- +experiment=digits_label_skew
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

BEGIN, END = "<!-- measured: begin -->", "<!-- measured: end -->"
ROOT = Path(__file__).resolve().parents[2]


def run_compare(overrides: list[str], run_dir: Path) -> tuple[str, float]:
    """Run the compare (in-process: the same numbers as on Ray, without its start-up); return (command, wall s)."""
    command = ["python", "-m", "sim.compare", *overrides, "engine.backend=inprocess", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    subprocess.run([sys.executable, *command[1:]], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return shlex.join(command[:-1]), time.perf_counter() - start


def fmt_gain(value: float, low: float, high: float, note: str) -> str:
    """A gain in points with its 95% interval, or why there is none."""
    if pd.isna(value):
        return "—"
    if pd.isna(low) or pd.isna(high):
        why = str(note).split(":")[0] if isinstance(note, str) and note else "no interval"
        return f"{value:+.1f} ({why})"
    return f"{value:+.1f} ({low:+.1f} to {high:+.1f})"


def block(run_dir: Path, command: str, wall: float | None) -> str:
    """The measured block: date, command, summary and per-institution gains."""
    summary = pd.read_csv(run_dir / "summary.csv")
    gains = pd.read_csv(run_dir / "tables" / "gains.csv")
    when = dt.datetime.fromtimestamp((run_dir / "summary.csv").stat().st_mtime, dt.timezone.utc)
    cores = os.cpu_count()
    took = f", {wall:.0f} s wall" if wall is not None else ""
    out = [BEGIN, "", f"*Measured {when:%Y-%m-%d} (UTC) on {cores} cores ({platform.machine()}){took}; "
           f"produced by `python docs/results/make_page.py`.*", "", "```bash", command, "```", "",
           "| scheme | seeds | global accuracy | mean accuracy | worst accuracy | mean gain (points, 95% interval) "
           "| worse off | megabytes |", "|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        gain = "0 (baseline)" if r["scheme"] == "isolated" else fmt_gain(
            r["mean_gain"], r["mean_gain_low"], r["mean_gain_high"], r.get("mean_gain_note"))
        out.append(f"| `{r['scheme']}` | {r['seeds']} | {r['global_accuracy']:.3f} | {r['mean_accuracy']:.3f} | "
                   f"{r['worst_accuracy']:.3f} | {gain} | {r['worse_off']} | {r['megabytes']:.3f} |")
    schemes = [s for s in summary["scheme"] if s != "isolated" and s in set(gains["scheme"])]
    if schemes:
        out += ["", "Gain of each institution over training alone, in points (mean over seeds, 95% interval):", "",
                "| institution | " + " | ".join(f"`{s}`" for s in schemes) + " |", "|---" * (len(schemes) + 1) + "|"]
        for name, rows in gains.groupby("institution", sort=False):
            by = rows.set_index("scheme")
            cells = [fmt_gain(by.at[s, "gain"], by.at[s, "gain_low"], by.at[s, "gain_high"], by.at[s, "gain_note"])
                     if s in by.index else "—" for s in schemes]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out + ["", END])


def main(argv: list[str] | None = None) -> int:
    """Run (or read) the compare and rewrite the page's measured block."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--run-dir", type=Path, help="read this finished compare instead of running one")
    parser.add_argument("--command", help="with --run-dir: the command that made it, as printed on the page")
    parser.add_argument("--wall", type=float, help="with --run-dir: its measured wall seconds")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: the compare's overrides
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]
    text = args.page.read_text()
    if BEGIN not in text or END not in text:
        parser.error(f"{args.page}: no {BEGIN} ... {END} block to fill")
    if args.run_dir:
        run_dir, wall = args.run_dir, args.wall
        command = args.command or shlex.join(["python", "-m", "sim.compare", *args.overrides])
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="collabsim-results-")) / "compare"
        command, wall = run_compare(args.overrides, run_dir)
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block(run_dir, command, wall), text, flags=re.S)
    args.page.write_text(new)
    print(f"{args.page}: measured block from {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
