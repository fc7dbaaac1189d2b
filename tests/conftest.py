"""Shared fixtures: a session-scoped Ray cluster with fractional CPUs, and small configs."""

from __future__ import annotations

import os
import tempfile

import pytest

from sim.cli import compose

# Small enough for a 2-core CI machine: few institutions' worth of data, few rounds.
SMALL = ["smoke=true", "rounds=2", "data.num_samples=600"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session; 4 logical CPUs so fractional requests fit on 2 cores."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short path: Ray's sockets live here
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp, configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def small_cfg():
    """Compose a shrunken run config with extra overrides."""

    def make(*overrides: str):
        return compose("config", SMALL + list(overrides))

    return make
