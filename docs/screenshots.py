"""Take the docs' screenshots with headless Chromium: ``python docs/screenshots.py [--report RUN_DIR] [-- OVERRIDES]``.

Two pictures, both of real output:

- ``docs/report.png``: the first screen of the HTML report of a real compare. Without ``--report`` it runs
  ``python -m sim.compare OVERRIDES engine.backend=inprocess`` into a temporary folder first (default: no
  overrides, the built-in default compare).
- ``docs/images/docs-front-page.png``: the front page of this documentation site, built with
  ``python -m mkdocs build --strict`` into a temporary folder.

Needs the ``chromium`` binary (Debian: ``apt-get install -y chromium``); CI does not run this script. Look at the
pictures before committing them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT_PNG = ROOT / "docs" / "report.png"
FRONT_PNG = ROOT / "docs" / "images" / "docs-front-page.png"


def chromium() -> str:
    """The Chromium binary, or a one-line exit naming how to get it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("error: chromium not found; install it (Debian: apt-get install -y chromium)")


def shoot(url: str, out: Path, width: int, height: int) -> None:
    """A screenshot of ``url`` at ``width`` x ``height`` CSS pixels, offline and with a throwaway profile."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {out.relative_to(ROOT)} from {url}")


def report(run_dir: Path | None, overrides: list[str], scratch: Path) -> Path:
    """The report.html of a real compare: the one given, or a fresh run of the default compare."""
    if run_dir is None:
        run_dir = scratch / "compare"
        subprocess.run([sys.executable, "-m", "sim.compare", *overrides, "engine.backend=inprocess",
                        f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    page = run_dir / "report.html"
    if not page.is_file():
        sys.exit(f"error: {page}: no report; run `python -m analysis report {run_dir}` first")
    return page


def site(scratch: Path) -> Path:
    """The docs site, built strictly."""
    out = scratch / "site"
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, check=True,
                   env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)})
    return out / "index.html"


def main(argv: list[str] | None = None) -> int:
    """Take both screenshots (or one, with --only)."""
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="a finished compare's run directory (else one is run)")
    parser.add_argument("--only", choices=("report", "front"), help="take one of the two")
    args = parser.parse_args(argv[:cut])
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if args.only != "front":
            shoot(report(args.report, argv[cut + 1:], scratch).as_uri(), REPORT_PNG, 1100, 1500)
        if args.only != "report":
            shoot(site(scratch).as_uri(), FRONT_PNG, 1280, 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
