"""The warm local cluster: a command joins it, says so in one line, leaves it running and computes the same numbers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from agents.runtime import cluster, nodes
from conftest import SMALL
from sim.engine import run

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_command_joins_the_warm_cluster_leaves_it_up_and_computes_the_same_numbers(tmp_path, small_cfg, ray_cluster):
    # Prepare: a home of its own (its token, its cluster record), and the warm cluster started as a user starts it
    env = {k: v for k, v in os.environ.items() if k not in (*cluster.TOKEN_VARIABLES, "RAY_ADDRESS")}
    env |= {"HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}

    def command(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *argv], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)

    up = command("sim.cluster", "up", "--num-cpus", "2")
    try:
        assert up.returncode == 0 and up.stdout.startswith("up: "), up.stdout + up.stderr[-2000:]
        record = json.loads((tmp_path / "home" / ".ray" / nodes.RECORD).read_text())
        for private in ("auth_token", nodes.RECORD):  # the token, and where the cluster it opens lives: owner only
            assert stat.S_IMODE((tmp_path / "home" / ".ray" / private).stat().st_mode) == 0o600
        warm_at_up = nodes.warm_workers(record["temp_dir"])
        # Execute: a plain command, no cluster.address
        done = command("sim", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
        after = command("sim.cluster", "status")
        deadline = time.monotonic() + 60  # the workers the command's end asked for load torch (seconds)
        while nodes.warm_workers(record["temp_dir"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        # A worker that finished loading while another still loaded may have asked for one more: the raylet ends
        # idle workers beyond its soft limit (one per CPU and the spare) within a second or two of idling
        counts = [nodes.warm_workers(record["temp_dir"])]
        while counts[-2:] != [3, 3] and time.monotonic() < deadline + 30:
            time.sleep(0.5)
            counts.append(nodes.warm_workers(record["temp_dir"]))
        warm_after = counts[-1]
        # What the cluster's processes were told, read back from its GCS: results up to 1 MiB return in the reply
        probe = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(address='auto', _temp_dir="
                                f"{record['temp_dir']!r}, configure_logging=False, log_to_driver=False); "
                                "print(json.dumps(ray._private.state.state.get_system_config()))"],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        down = command("sim.cluster", "down")
    # Assert: it joined (one line), the cluster outlived it, and its numbers equal a run on a cluster of its own
    said = done.stdout + done.stderr
    assert done.returncode == 0 and said.count("joined the warm local Ray cluster") == 1, said[-3000:]
    # ... the line is in the run's own log too, though the command joined (to start its actors) before Hydra set it up
    assert "joined the warm local Ray cluster" in (tmp_path / "run" / "__main__.log").read_text()
    assert after.stdout.startswith("up: "), after.stdout
    # ... and the next command finds warm workers again: one per CPU and the coordinator's spare, as after up
    assert (warm_at_up, warm_after) == (3, 3), counts
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]).items() >= cluster.INLINE_RESULTS.items(), probe.stdout
    own = run(small_cfg())  # Ray actors on the test session's own local cluster
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "metrics.parquet"), own.metrics)
    # ... and down stopped every process of it, by id, and forgot it
    assert down.returncode == 0 and down.stdout.startswith("down: stopped"), down.stdout + down.stderr
    assert not nodes.processes(record["temp_dir"]) and command("sim.cluster", "status").stdout.startswith("down:")


def test_the_rehearsal_runs_a_valid_pooled_population_with_a_checkpoint_every_round():
    from sim.checks import load_spec
    from sim.cli import compose
    from sim.cluster.rehearse import workload

    # The node-failure rehearsal (python -m sim.cluster.rehearse, run by hand: three ray start nodes) stays runnable:
    # its workload passes the pre-run checks, pooled, checkpointed every round so a resume loses no round
    spec = load_spec(compose("config", workload(50, 5, 3)))
    assert (spec.placement, spec.checkpoint_every, len(spec.scenario.institutions)) == ("pooled", 1, 50)
