"""Independent simulations fanned out as Ray tasks: one call per item, results as they finish.

What a command that runs many whole simulations in parallel needs (contribution analysis's
coalitions): each item is a Ray task running ``fn(shared, item)`` in-process, ``shared`` put
once in the object store, so many items share the cluster's cores without nesting actor start-ups.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_tasks(fn: Callable[[Any, T], R], shared: Any, items: Iterable[T], *, cpus: float,
              cluster: Mapping[str, Any]) -> Iterator[tuple[T, R]]:
    """``(item, fn(shared, item))`` for every item, each a Ray task asking ``cpus`` CPUs, in the order they finish."""
    import ray

    from agents.runtime.cluster import connect

    connect(dict(cluster))
    task = ray.remote(num_cpus=cpus)(fn)
    ref = ray.put(shared)
    pending = {task.remote(ref, item): item for item in items}
    while pending:  # one ray.wait per result: never a ray.get in a loop over pending work
        done, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done[0]), ray.get(done[0])
