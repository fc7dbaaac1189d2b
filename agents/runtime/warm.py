"""Warm actors: Ray actor bodies that outlive runs, and the pool a command lends them from.

A command that runs many simulations (a compare over schemes and seeds, say) starts its
processes once: each run borrows a coordinator and hosts from an :class:`ActorPool`, gives
them its institutions with ``load`` (state reset, process, torch and imports kept), and
hands them back when it ends. Plain classes here; Ray wraps them where the pool starts them.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any, Callable

from agents.coordinator import Coordinator
from agents.host import Host


class ActorError(RuntimeError):
    """An exception raised in an actor that would not unpickle in the driver, carried as its one line instead.

    Ray ships an actor's exception to the driver pickled; a class whose constructor takes other arguments than its
    message fails to rebuild there, and the user would read "Failed to deserialize exception" instead of the reason.
    """


def portable(error: BaseException) -> BaseException:
    """``error`` itself when it survives the trip to the driver, else an :class:`ActorError` with its first line."""
    try:
        back = pickle.loads(pickle.dumps(error))
        if type(back) is type(error) and str(back) == str(error):
            return error
    except Exception:  # noqa: BLE001 - any failure to round-trip is what this guards against
        pass
    lines = str(error).strip().splitlines()
    return ActorError(f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)


def errors_travel(cls: type) -> type:
    """Wrap every public method of actor body ``cls`` so what it raises reaches the driver readable (:func:`portable`)."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except Exception as e:
                out = portable(e)
                if out is e:
                    raise
                raise out from None

        return call

    for name in dir(cls):
        attr = getattr(cls, name)
        if not name.startswith("_") and callable(attr) and not isinstance(attr, type):
            setattr(cls, name, wrap(attr))
    return cls


@errors_travel
class WarmHost(Host):
    """A host actor's body that outlives runs: ``load`` gives it a run's institutions, keeping process, torch and imports."""

    def __init__(self):  # empty until load: the process starts once per command, not once per run
        pass

    def load(self, specs, shards, **common) -> int:
        """Take on a new run's institutions and shards (all previous state dropped); returns the pid."""
        Host.__init__(self, specs, shards, **common)
        return os.getpid()


@errors_travel
class WarmCoordinator(Coordinator):
    """A coordinator actor's body that outlives runs, like :class:`WarmHost`."""

    def __init__(self):
        pass

    def load(self, specs, *, data_parallel=None, **kwargs) -> int:
        """Take on a new run (scheme, global model, ledger); returns the pid.

        ``data_parallel``: a :class:`~agents.runtime.ray_train.WorkerPlan` when the run's central training is a
        Ray Train job (pooled data), None to train in this process."""
        if getattr(self, "data_parallel", None) is not None:
            self.close()  # the last run's Ray Train job, if it was not ended
        Coordinator.__init__(self, specs, **kwargs)
        if data_parallel is not None:
            from agents.runtime.ray_train import DataParallel

            self.data_parallel = DataParallel(data_parallel, model=kwargs["model"], shape=kwargs["shape"],
                                              training=kwargs["training"], seed=kwargs["seed"],
                                              threads=kwargs.get("threads", 1))
        return os.getpid()


class ActorPool:
    """Warm actors one command reuses for all its runs (schemes, seeds, coalitions): start-up is paid once.

    A run borrows a coordinator and one host per slot of its layout, matched by resource
    request; what it returns (replacements for actors lost to faults included) serves the
    next run. :meth:`close` ends them all.
    """

    def __init__(self):
        import ray

        self.ray = ray
        self.idle_hosts: list[tuple[tuple[float, float], Any]] = []  # ((cpus, gpus), actor)
        self.idle_coordinators: list[tuple[float, Any]] = []
        self.started = 0  # actors this pool has started

    def host(self, cpus: float, gpus: float):
        """An idle host actor with this request, or a new one."""
        for k, (req, actor) in enumerate(self.idle_hosts):
            if req == (cpus, gpus):
                return self.idle_hosts.pop(k)[1]
        return self.new_host(cpus, gpus)

    def new_host(self, cpus: float, gpus: float):
        """A new host actor with this request, spread over the cluster's nodes (hosts do the training: a node lost
        costs fewer of them); inside a placement group (a Tune trial) it stays in the group's bundles."""
        from ray.util import get_current_placement_group

        self.started += 1
        spread = {} if get_current_placement_group() is not None else {"scheduling_strategy": "SPREAD"}
        return self.ray.remote(WarmHost).options(num_cpus=cpus, num_gpus=gpus, **spread).remote()

    def coordinator(self, cpus: float):
        """An idle coordinator actor with this request, or a new one."""
        for k, (req, actor) in enumerate(self.idle_coordinators):
            if req == cpus:
                return self.idle_coordinators.pop(k)[1]
        self.started += 1
        return self.ray.remote(WarmCoordinator).options(num_cpus=cpus).remote()

    def end_idle(self) -> None:
        """End the idle actors: a run whose layout differs (new actors, a Ray Train job) must not wait on their room."""
        for _, a in [*self.idle_coordinators, *self.idle_hosts]:
            self.ray.kill(a)
        self.idle_hosts, self.idle_coordinators = [], []

    def give_back(self, coordinator: tuple[float, Any], hosts: list[tuple[tuple[float, float], Any]]) -> None:
        """Actors a finished run no longer needs."""
        self.idle_coordinators.append(coordinator)
        self.idle_hosts.extend(hosts)

    def close(self) -> None:
        """End every actor of the pool."""
        self.end_idle()
