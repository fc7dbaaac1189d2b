"""What a local cluster's worker processes import as Ray starts them (Ray's ``preload_python_modules``).

The actors' code (:mod:`agents.runtime.warm`, which imports torch), and torch's optimiser machinery: the first
``torch.optim`` optimiser a process builds imports torch's compiler stack (about 0.9 s on one core), which a host
would otherwise pay in its first round. A worker that has imported this module is what ``python -m sim.cluster
status`` counts as warm.

On the warm local cluster (``python -m sim.cluster up``), a worker owned by no job that has finished loading asks
its node for the warm workers still missing (:func:`agents.runtime.cluster.top_up`): a raylet starts at most one
worker per CPU at a time, so the spare worker a command's coordinator takes cannot be asked for as the command ends.
"""

from __future__ import annotations

import fcntl
import os

import torch

from agents.runtime import warm  # noqa: F401  (imported for its side effect: the actors' code is loaded)

WARM_CLUSTER = "COLLABSIM_WARM_CLUSTER"
"""Set in the environment of the warm cluster's nodes (and so of their workers) by ``python -m sim.cluster up``."""

torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # imports what every later optimiser needs


def _serialization() -> None:
    """Make the worker's serialization context now, as its first task would (Ray registers its serializers then, and
    imports pydantic and its DAG classes for them: about 0.1 s of the first actor call a command waits for)."""
    import ray

    worker = ray._private.worker.global_worker
    if worker.connected:
        worker.get_serialization_context()


def _top_up() -> None:
    """Ask this worker's node for the warm workers it still lacks, when this is a warm-cluster worker of no job."""
    import ray

    from agents.runtime import cluster, nodes

    worker = ray._private.worker.global_worker
    if not os.environ.get(WARM_CLUSTER) or not worker.connected or not worker.current_job_id.is_nil():
        return  # a command's own worker, or not the warm cluster: nothing to start
    lock = nodes.record_path().with_suffix(".lock")
    with open(lock, "a") as held:  # one worker at a time counts and asks: two at once would both ask for the spare
        fcntl.flock(held, fcntl.LOCK_EX)
        cluster.top_up()


try:
    _serialization()
    _top_up()
except Exception:  # noqa: BLE001 - a worker that cannot ask still serves; the next command may start one cold
    pass
