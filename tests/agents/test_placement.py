"""Placement: dedicated or pooled hosts, and impossible resource requests refused up front."""

import pytest

from agents.runtime.placement import plan_layout
from sim.cli import compose
from sim.checks import load_spec
from sim.core.types import ConfigError


def spec_of(*overrides):
    return load_spec(compose("config", ["smoke=true", *overrides]))


def test_auto_uses_dedicated_actors_when_they_fit_and_there_are_cores_for_them():
    spec = spec_of()
    assert plan_layout(spec, spec.scenario.institutions, cpus=2, gpus=0).mode == "pooled"  # 6 processes on 2 cores: no
    layout = plan_layout(spec, spec.scenario.institutions, cpus=8, gpus=0)
    assert layout.mode == "dedicated"
    assert [h.indices for h in layout.hosts] == [(i,) for i in range(6)]
    assert [h.cpus for h in layout.hosts] == [s.cpus for s in spec.scenario.institutions]


def test_auto_pools_a_large_population_over_few_hosts():
    spec = spec_of("scenario.num_institutions=50")
    layout = plan_layout(spec, spec.scenario.institutions, cpus=2, gpus=0)
    assert layout.mode == "pooled" and len(layout.hosts) == 2
    hosted = sorted(i for h in layout.hosts for i in h.indices)
    assert hosted == list(range(50))  # everybody hosted exactly once
    assert sum(h.cpus for h in layout.hosts) + layout.coordinator_cpus <= 2


def test_dedicated_request_larger_than_the_cluster_is_refused():
    # cluster.num_cpus=64: the spec itself passes the pre-run check, which would refuse it on a small machine
    spec = spec_of("placement=dedicated", "scenario.num_institutions=20", "scenario.cpus=0.5", "cluster.num_cpus=64")
    with pytest.raises(ConfigError) as err:
        plan_layout(spec, spec.scenario.institutions, cpus=2, gpus=0)
    assert err.value.key == "placement"


def test_more_gpus_than_a_gpu_cluster_has_is_refused():
    spec = spec_of("scenario.num_institutions=3", "scenario.gpus=1", "placement=dedicated")
    with pytest.raises(ConfigError) as err:
        plan_layout(spec, spec.scenario.institutions, cpus=8, gpus=2)
    assert "3 GPUs" in str(err.value)


def test_gpu_scenario_runs_on_cpu_with_a_warning_when_the_cluster_has_no_gpu():
    spec = spec_of("scenario.num_institutions=3", "scenario.gpus=0.5")
    layout = plan_layout(spec, spec.scenario.institutions, cpus=2, gpus=0)
    assert all(h.gpus == 0 for h in layout.hosts)
    assert len(layout.warnings) == 1 and "running on CPU" in layout.warnings[0]


def test_gpu_scenario_is_refused_without_gpu_when_required():
    spec = spec_of("scenario.num_institutions=3", "scenario.gpus=0.5", "engine.gpu_policy=require", "cluster.num_gpus=2")
    with pytest.raises(ConfigError) as err:
        plan_layout(spec, spec.scenario.institutions, cpus=2, gpus=0)
    assert err.value.key == "scenario.institutions[0].gpus"


def test_bundles_reserve_coordinator_and_every_host():
    spec = spec_of()
    layout = plan_layout(spec, spec.scenario.institutions, cpus=8, gpus=0)
    assert layout.bundles[0] == {"CPU": 0.25}
    assert len(layout.bundles) == 7


def test_a_resumed_run_that_no_longer_fits_dedicated_actors_continues_pooled():
    # Prepare: the default scenario on dedicated actors (1.55 CPUs with the coordinator), and a resume on 1 CPU
    from dataclasses import replace

    spec = spec_of("placement=dedicated")
    # Execute / Assert: a fresh run is refused as before; the resumed one is laid out pooled, and says so
    with pytest.raises(ConfigError, match="dedicated actors ask for 1.55 CPUs but the cluster has 1"):
        plan_layout(spec, spec.scenario.institutions, cpus=1, gpus=0)
    layout = plan_layout(replace(spec, resume="/some/run"), spec.scenario.institutions, cpus=1, gpus=0)
    assert layout.mode == "pooled" and sorted(i for h in layout.hosts for i in h.indices) == list(range(6))
    assert "continues on pooled hosts" in layout.warnings[0]


def test_pooled_hosts_on_several_nodes_are_sized_to_fit_each_node():
    from agents.runtime.placement import node_sized

    # Prepare: three 1-CPU nodes; equal hosts sized on the 3-CPU total (0.92 each) left no node room for the coordinator
    spec = spec_of("scenario.num_institutions=30")
    # Execute
    layout = plan_layout(spec, spec.scenario.institutions, cpus=3, gpus=0, nodes=[1.0, 1.0, 1.0])
    # Assert: one host per node, the coordinator's quarter taken from one of them; largest first (started first)
    assert [h.cpus for h in layout.hosts] == [1.0, 1.0, 0.75] and layout.coordinator_cpus == 0.25
    assert node_sized([2.0, 1.0], 0.25) == [1.0, 0.875, 0.875]  # a 2-CPU node shares its 1.75 between two hosts
    assert sorted(i for h in layout.hosts for i in h.indices) == list(range(30))
