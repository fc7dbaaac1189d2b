"""Simulated time: what a round would take on the institutions' real compute and links.

Measured wall time on a laptop says nothing about a consortium of hospitals and labs,
and it changes from run to run. The clock instead converts the work each institution
does (multiply-adds) and the bytes it moves into seconds at the compute and bandwidth
its spec declares, so simulated time is deterministic and comparable across machines.
"""

from __future__ import annotations

from sim.core.types import InstitutionSpec

FLOPS_PER_CPU = 2e9  # sustained multiply-adds/s of one CPU core on small dense layers
FLOPS_PER_GPU = 2e12  # a modest datacenter GPU on the same workload (an order of 1000x a core)
TRAIN_COST = 3  # forward + backward is about three forward passes
MIN_CPUS = 0.1  # an institution declaring less compute than this many cores is run (and priced) at this many


def compute_seconds(spec: InstitutionSpec, samples_processed: int, flops_per_sample: int) -> float:
    """Seconds of local training for ``samples_processed`` forward+backward passes at the spec's compute."""
    if samples_processed == 0:
        return 0.0
    return TRAIN_COST * samples_processed * flops_per_sample / flops_rate(spec)


def flops_rate(spec: InstitutionSpec) -> float:
    """Multiply-adds per second the institution sustains: its GPUs and CPUs, times its ``speed`` factor."""
    rate = spec.gpus * FLOPS_PER_GPU + spec.cpus * FLOPS_PER_CPU
    # An institution with no declared compute still trains; charge it a tenth of a core.
    return max(rate, MIN_CPUS * FLOPS_PER_CPU) * spec.speed


def transfer_seconds(spec: InstitutionSpec, bytes_up: int, bytes_down: int) -> float:
    """Seconds to move the round's bytes over the institution's link, plus latency each way used."""
    if bytes_up == 0 and bytes_down == 0:
        return 0.0
    legs = (bytes_up > 0) + (bytes_down > 0)
    return (bytes_up + bytes_down) * 8 / (spec.bandwidth_mbps * 1e6) + legs * spec.latency_s
