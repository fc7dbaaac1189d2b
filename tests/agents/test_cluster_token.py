"""The local cluster's token is its owner's alone: the file that lets a client run code is never readable by others."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from agents.runtime import cluster

REPO = Path(__file__).resolve().parents[2]


def modes(token: Path) -> tuple[int, int]:
    """(the token file's permission bits, its folder's)."""
    return stat.S_IMODE(token.stat().st_mode), stat.S_IMODE(token.parent.stat().st_mode)


def test_a_local_cluster_started_as_a_command_does_keeps_its_token_private(tmp_path) -> None:
    # Prepare: a home of its own, no token yet; Ray would write one world-readable (0644 under the usual umask)
    env = {k: v for k, v in os.environ.items() if k not in (*cluster.TOKEN_VARIABLES, "RAY_ADDRESS")}
    env |= {"HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    code = ("import ray; from agents.runtime import cluster; cluster.connect({'num_cpus': 1}); "
            "print('answer', ray.get(ray.remote(num_cpus=0.1)(lambda: 7).remote())); cluster.disconnect()")
    # Execute: a local cluster started the way every command starts it, and a task run on it (the token works)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    # Assert: the cluster ran with the token, which only its owner can read
    assert done.returncode == 0 and "answer 7" in done.stdout, done.stderr[-2000:]
    token = tmp_path / ".ray" / "auth_token"
    assert modes(token) == (0o600, 0o700)
    assert len(token.read_text().strip()) == 64


def test_a_token_left_readable_by_others_is_tightened_and_kept(tmp_path, monkeypatch) -> None:
    # Prepare: a token an earlier Ray wrote world-readable, in a world-readable folder
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in cluster.TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir(mode=0o755)
    token.write_text("a" * 64)
    token.chmod(0o644)
    # Execute
    assert cluster.private_token() == token
    # Assert: the same token (a running cluster still accepts it), now its owner's alone
    assert token.read_text() == "a" * 64 and modes(token) == (0o600, 0o700)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "given")  # a token handed over in the environment is the user's to keep
    assert cluster.private_token() is None
