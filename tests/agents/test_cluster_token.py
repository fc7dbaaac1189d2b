"""The local cluster's token is its owner's alone: the file that lets a client run code is never readable by others."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

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


NETWORK = """
set -e
ip link set lo up
ip link add collab0 type veth peer name collab1
ip addr add 10.200.0.1/24 dev collab0
ip link set collab0 up; ip link set collab1 up
ip route add default dev collab0
exec "$@"
"""
"""A network of the test's own (a new network namespace, nothing in it leaves it): the machine's address is 10.200.0.1
and a default route makes Ray pick it as the node's address, as on a machine with a real network."""

CLIENTS = r"""
import os, subprocess, sys
import ray
from agents.runtime import cluster

cluster.connect({'num_cpus': 1})
gcs = ray._private.worker.global_worker.node.gcs_address
print('gcs', gcs)
token = open(os.path.expanduser('~/.ray/auth_token')).read().strip()
client = ("import sys, ray\n"
          "try:\n"
          "    ray.init(address=sys.argv[1], configure_logging=False)\n"
          "except ConnectionError as e:\n"
          "    print('no connection'); raise SystemExit(3)\n"
          "print('ran', ray.get(ray.remote(num_cpus=0.1)(lambda: 7).remote()))\n")
for name, given in (('wrong', '0' * 64), ('right', token)):
    env = {k: v for k, v in os.environ.items() if k not in ('RAY_ADDRESS', 'RAY_AUTH_TOKEN_PATH')}
    env['RAY_AUTH_TOKEN'] = given
    done = subprocess.run([sys.executable, '-c', client, gcs], env=env, capture_output=True, text=True, timeout=120)
    said = 'token refused' if 'InvalidAuthToken' in done.stdout + done.stderr else 'token not refused'
    print(name, done.returncode, done.stdout.strip().replace(chr(10), ' | '), '|', said)
cluster.disconnect()
"""


def own_network() -> list[str]:
    """The command prefix that runs a command in a network namespace of its own, or [] where the sandbox allows none."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    probe = subprocess.run(["unshare", "-n", "sh", "-c", NETWORK, "sh", "true"], capture_output=True, timeout=30)
    return ["unshare", "-n", "sh", "-c", NETWORK, "sh"] if probe.returncode == 0 else []


def test_a_client_from_the_machines_own_address_needs_the_token(tmp_path) -> None:
    # Prepare: a network of the test's own, where the machine's non-loopback address is 10.200.0.1
    prefix = own_network()
    if not prefix:
        assert not os.environ.get("CI"), "CI must run this test: it needs `unshare -n` and `ip` (root in the sandbox)"
        pytest.skip("this sandbox cannot make a network namespace (unshare -n)")
    env = {k: v for k, v in os.environ.items() if k not in (*cluster.TOKEN_VARIABLES, "RAY_ADDRESS")}
    env |= {"HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    # Execute: a local cluster started as a command starts it; a client on the machine's own address with a wrong
    # token, then with the cluster's token (the control)
    done = subprocess.run([*prefix, sys.executable, "-c", CLIENTS], env=env, capture_output=True, text=True, timeout=300)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    # Assert: Ray serves on the non-loopback address; the wrong token is refused, the right one runs code
    assert done.returncode == 0, done.stderr[-2000:]
    assert lines["gcs"].startswith("10.200.0.1:"), lines
    assert lines["wrong"] == "3 no connection | token refused", lines
    assert lines["right"] == "0 ran 7 | token not refused", lines
