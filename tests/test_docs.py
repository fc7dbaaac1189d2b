"""The documentation site: it builds strictly, its reference is generated from the current code, and names every key.

The site is built once per module (a subprocess, as `python -m mkdocs build --strict` runs); the reference pages are
checked against what `docs/gen_reference.py` makes now and against the config schema's own list of keys.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD_LIMIT_S = 60  # the bound on 2 cores; an idle 2-core machine builds it in about 10 s


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`python -m mkdocs build --strict` on ``config`` into ``site``."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The whole site, built once: (the finished process, its wall seconds, the site folder)."""
    site = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    done = _mkdocs(ROOT / "mkdocs.yml", site)
    return done, time.perf_counter() - start, site


@pytest.fixture(scope="module")
def generator():
    """docs/gen_reference.py as a module."""
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_site_builds_strictly_in_time(built):
    # Assert: no warning (strict), within the bound, every nav page and the generated API page written
    done, seconds, site = built
    assert done.returncode == 0, done.stdout + done.stderr
    assert seconds < BUILD_LIMIT_S, f"docs build took {seconds:.0f} s"
    for page in ("index.html", "reference/config.html", "reference/api.html", "results/index.html"):
        assert (site / page).is_file(), page
    assert 'class="doc doc-object' in (site / "reference" / "api.html").read_text()  # mkdocstrings rendered the code


def test_site_fetches_nothing(built):
    # Assert: no page loads a script, style or font from another host (offline at build and view time)
    _, _, site = built
    loads = set()
    for page in site.rglob("*.html"):
        loads |= set(re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?://[^"]+)"', page.read_text()))
    assert not loads, sorted(loads)


@pytest.mark.parametrize("page, nav", [
    ("See [the design](design.md) and [a key](index.md#no-such-heading).\n", None),  # a broken link and anchor
    ("# Home\n", ["index.md", "missing.md"]),  # a nav entry without its page
])
def test_strict_build_refuses_broken_links_and_missing_pages(tmp_path, page, nav):
    # Prepare: a site with the project's own validation settings and one fault
    settings = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(page)
    config = {"site_name": "t", "docs_dir": str(docs), "validation": settings["validation"],
              "strict": settings["strict"], **({"nav": nav} if nav else {})}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    # Execute
    done = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    # Assert: the build fails and says why
    assert done.returncode != 0
    assert "missing.md" in done.stderr or "design.md" in done.stderr or "no-such-heading" in done.stderr


def test_generated_reference_is_current(generator, capsys):
    # Execute: what the generator would write now, compared with the committed pages
    stale = generator.main(["--check"])
    # Assert
    assert stale == 0, capsys.readouterr().err


def _schema_keys() -> set[str]:
    """Every config key the schema types: its tables, and the keywords of each option's class (as sim.checks reads them)."""
    from sim.core import schema

    keys = {k for k, f in schema.TOP.items() if f.kind != "group"}
    for prefix, table in (("training", schema.TRAINING), ("results", schema.RESULTS), ("engine", schema.ENGINE),
                          ("cluster", schema.CLUSTER), ("scenario", schema.SCENARIO),
                          ("scenario.institutions[]", schema.INSTITUTION), ("costs", schema.COSTS),
                          ("costs.institutions.NAME", schema.PRICES)):
        keys |= {f"{prefix}.{k}" for k in table}
    keys |= {f"data.{k}" for fields in schema.DATA.values() for k in fields}
    for group in ("scheme", "model", *schema.WRAPPERS):
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
            if not target:
                continue
            module, _, name = target.rpartition(".")
            factory = getattr(__import__(module, fromlist=[name]), name)
            count = schema.Field("int", 1) if group == "model" else schema.Field("int", 0)
            fields = schema.signature_fields(factory, count, skip=("input_shape", "num_classes", "inner")) or {}
            keys |= {f"{group}.{k}" for k in fields}
    return keys


def test_reference_names_every_schema_key():
    # Prepare: the keys the config reference lists (first column of its tables), before the entry points' sections
    text = (ROOT / "docs" / "reference" / "config.md").read_text()
    run_part = text.split("## `python -m sim.compare`")[0]
    listed = set(re.findall(r"^\| `([^`]+)` \|", run_part, flags=re.M))
    # Assert: exactly the schema's keys, none missing and none invented
    expected = _schema_keys()
    assert expected - listed == set(), f"missing from the reference: {sorted(expected - listed)}"
    assert listed - expected == set(), f"in the reference but not in the schema: {sorted(listed - expected)}"
