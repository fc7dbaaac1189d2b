"""The benchmark script: its timeline arithmetic, its flags, and one tiny end-to-end run (numbers exist, work matches)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from sim.bench.cli import parse
from sim.bench.measure import timeline


def test_timeline_takes_the_pace_from_the_rounds_after_the_first():
    # Prepare: round lines at 5, 6, 7 s after launch, the command ends at 8 s.
    round_at = {1: 5.0, 2: 6.0, 3: 7.0}
    # Execute
    t = timeline(round_at, 8.0)
    # Assert: 1 s per round, so round 1 started at 4 s; 1 s after the last line.
    assert t == {"startup_s": 4.0, "loop_s": 3.0, "round_s": 1.0, "teardown_s": 1.0}


def test_timeline_takes_the_pace_from_the_steady_rounds_not_the_last_which_scores_everybody():
    # Prepare: rounds 2 and 3 take 1 s each; round 4, the last, scores every institution and takes 5 s.
    t = timeline({1: 5.0, 2: 6.0, 3: 7.0, 4: 12.0}, 13.0)
    # Assert: the pace is 1 s a round; the loop still holds every round, the slow last one included.
    assert t == {"startup_s": 4.0, "loop_s": 8.0, "round_s": 1.0, "teardown_s": 1.0}


def test_timeline_needs_two_rounds():
    assert all(math.isnan(v) for v in timeline({1: 5.0}, 8.0).values())


def test_unknown_section_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse(["--only", "P,Q"])
    assert "unknown section 'Q'" in capsys.readouterr().err


def test_default_sections_leave_out_the_sweep_unless_asked():
    assert "sweep" not in parse([]).sections
    assert parse(["--sweep"]).sections[-1] == "sweep"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_run_prints_and_writes_positive_numbers(tmp_path):
    # Prepare: the smallest P workload, collabsim in-process (no Ray start-up in CI).
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "sim.bench", "--quick", "--only", "P", "--set", "engine.backend=inprocess",
            "--json", str(out)]
    # Execute
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    # Assert: it ran, printed the P row, and every timing and memory number is there and positive.
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(line.startswith("P ") for line in done.stdout.splitlines()), done.stdout
    p = json.loads(out.read_text())["results"]["P"]
    for side in ("plain", "collabsim"):
        for key in ("total_s", "startup_s", "loop_s", "round_s", "peak_rss_mib"):
            assert p[side][key] > 0, (side, key, p[side][key])
        assert p[side]["rounds"] == 3
    assert p["ratios"]["total"] > 0 and p["ratios"]["loop"] > 0
    # Same data, initial weights, cohorts and minibatch order: the plain loop must land on collabsim's model.
    # 0.02 allows a few of the ~360 test digits to flip on float rounding in the averaging order, no more.
    assert abs(p["plain"]["accuracy"] - p["collabsim"]["accuracy"]) <= 0.02


def test_targets_read_the_ratios_and_say_which_are_met():
    from sim.bench.cli import targets

    # Prepare: S's loop at 0.30x plain on Ray, 0.30x in-process; the 10,000 round at 1.1x the 1,000 one
    results = {"S": {"ratios": {"loop": 0.30}}, "S-inprocess": {"ratios": {"loop": 0.30}},
               "scale-1000-all": {"collabsim": {"round_s": 0.050}},
               "scale-10000-all": {"collabsim": {"round_s": 0.055, "peak_rss_mib": 2048.0}}}
    # Execute
    lines = targets(results).splitlines()
    # Assert: a line per target whose workloads ran, each saying met or not; the others are left out
    assert any("Ray / plain: 0.30 x (at most 0.35) - met" in line for line in lines)
    assert any("in-process / plain: 0.30 x (at most 0.25) - NOT met" in line for line in lines)
    assert any("1.10 x (at most 1.2) - met" in line for line in lines)
    assert any("2.00 GiB (at most 4) - met" in line for line in lines)
    assert not any("cluster" in line or "growth" in line for line in lines)


def test_driver_growth_is_read_between_the_first_third_and_the_second_last_round():
    from sim.bench.measure import CommandRun

    run = CommandRun(argv=[], total_s=1.0, returncode=0, peak_rss_mib=1.0,
                     driver_mib_at={r: 100.0 + r for r in range(1, 32)})  # 1 MiB more each round; the last is left out
    growth = run.driver_growth()
    assert growth["driver_mib"] == 130.0 and growth["driver_growth_mib_per_10_rounds"] == pytest.approx(10.0)
