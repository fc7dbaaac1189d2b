"""Backends run a round's work: in this process (tests, coalitions) or on Ray actors.

Both drive the same :class:`~agents.host.Host` and :class:`~agents.coordinator.Coordinator`
classes, so a result cannot depend on which backend produced it. The engine sees only
the methods of :class:`Backend`.

Process faults: on Ray a host that dies, raises or misses ``engine.round_timeout_s``
costs its institutions that round (ledger status ``crashed`` or ``timeout``), never the
run. The backend keeps what every institution carries between rounds (its personal
model, whether its data was handed over) as each round ends, so a replacement host
starts the next round exactly where the lost one stood. A coordinator that fails stops
the run with :class:`~sim.core.types.RunFailed`; ``python -m sim resume=RUN_DIR`` continues it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from agents.runtime import ray_train
from agents.coordinator import Coordinator, backdoor_of
from agents.host import Host
from agents.runtime.placement import Layout
from agents.runtime.warm import ActorError, ActorPool
from sim.core import faults
from sim.core.config import RunSpec
from sim.core.stragglers import Deadline
from sim.core.types import (ConfigError, Federation, InstitutionSpec, LocalPlan, RoundContext, RunFailed, Scores,
                            Snapshot)

log = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0  # a new actor imports torch and builds its model: slow on a busy machine, so not the round deadline
ROOM_CHECK_S = 2.0  # while a replacement host waits to start, how often the cluster's CPUs are checked against the run


class Backend(Protocol):
    """What the engine's round loop needs from wherever the institutions live."""

    def begin_round(self, round: int, sim_time: float) -> RoundContext:
        """Ask the coordinator for this round's cohort and plan."""

    def train_and_merge(self, ctx: RoundContext, score: bool = False, only: frozenset[str] | None = None
                        ) -> list[dict[str, Any]]:
        """Local steps of the cohort, then the merge; returns ledger rows. ``score``: the engine will call
        ``evaluate(ctx.plan, only)`` next, so a backend may start scoring as soon as the merge is done."""

    def evaluate(self, plan: LocalPlan, only: frozenset[str] | None = None) -> tuple[dict[str, float], Scores]:
        """Global-test scores and each institution's (or only those in ``only``) test scores, in scenario order."""

    def save(self) -> Snapshot:
        """Everything that persists between rounds, for a checkpoint."""

    def restore(self, snapshot: Snapshot) -> None:
        """Continue from a checkpoint."""

    def close(self) -> None:
        """Release actors."""


def pools_global(specs: tuple[InstitutionSpec, ...], fed: Federation) -> bool:
    """Whether the global test set's scores may be pooled from the institutions' own (:meth:`Scores.union`): every
    institution of the scenario takes part (the global sets are the union of all their splits) and no backdoor is
    scored (that needs triggered rows the hosts do not hold)."""
    return len(specs) == len(fed.shards) and backdoor_of(specs) is None


def _kwargs(spec: RunSpec, fed: Federation, flops: int) -> tuple[dict, dict]:
    """Constructor arguments shared by hosts and coordinator."""
    common = dict(
        model=spec.model, shape=(fed.input_shape, fed.num_classes), training=spec.training, seed=spec.seed,
        global_test=(fed.x_test, fed.y_test), threads=spec.engine.threads_per_institution,
        global_val=None if fed.y_val is None else (fed.x_val, fed.y_val),
        models=dict(spec.models), public=fed.x_public,  # institutions' own architectures; data.public's inputs
    )
    hosts = dict(common, vectorise=spec.engine.vectorise)
    sizes = {sh.name: sh.num_train for sh in fed.shards}
    coord = dict(common, scheme=spec.scheme, wrappers=spec.wrappers, flops_per_sample=flops,
                 deadline=Deadline(spec.stragglers, sizes, spec.training, flops))
    return hosts, coord


class InProcessBackend:
    """Everything in this process, one host for all: no Ray, for tests and small coalitions."""

    def __init__(self, spec: RunSpec, specs: tuple[InstitutionSpec, ...], fed: Federation, flops: int):
        ray_train.resolve(spec.scheme, "inprocess")  # an explicit scheme.trainer=ray_train needs Ray: refused here
        common, coord = _kwargs(spec, fed, flops)
        self.coordinator = Coordinator(specs, **coord)
        self.host = Host(specs, [fed.shards[s.index] for s in specs], initial=self.coordinator.current_state(), **common)
        self.state = None
        self.whole = pools_global(specs, fed)

    def begin_round(self, round: int, sim_time: float) -> RoundContext:
        ctx, self.state = self.coordinator.begin_round(round, sim_time)
        return ctx

    def train_and_merge(self, ctx: RoundContext, score: bool = False, only: frozenset[str] | None = None
                        ) -> list[dict[str, Any]]:
        updates, _ = self.host.train(ctx, self.state)
        return self.coordinator.merge(ctx, {}, updates)

    def evaluate(self, plan: LocalPlan, only: frozenset[str] | None = None):
        state = self.coordinator.current_state()  # the current global state
        each = self.host.evaluate(plan, state, only)
        glob = each.union() if self.whole and only is None else None
        return (self.coordinator.evaluate() if glob is None else glob), each

    def save(self) -> Snapshot:
        return Snapshot(*self.coordinator.snapshot(), self.host.persistent())

    def restore(self, snapshot: Snapshot) -> None:
        self.coordinator.restore(snapshot.global_state, snapshot.scheme)
        self.host.restore(snapshot.institutions)

    def close(self) -> None:
        pass


class RayBackend:
    """Hosts and coordinator as Ray actors with the resources the layout asks for, borrowed from a warm pool."""

    def __init__(self, spec: RunSpec, specs: tuple[InstitutionSpec, ...], fed: Federation, flops: int, layout: Layout,
                 pool: ActorPool | None = None):
        import ray

        self.ray = ray
        self.timeout = spec.engine.round_timeout_s
        self.own_pool = pool is None  # a pool made for this run alone ends with it
        self.pool = pool or ActorPool()
        common, coord = _kwargs(spec, fed, flops)
        coord["data_parallel"] = ray_train.in_trial(layout.workers, spec.scheme)  # pooled on Ray Train, or None
        # The actors first: Ray creates them (about 0.1 s, even on warm workers) while the data below is shipped.
        self.coordinator_cpus = layout.coordinator_cpus
        started = self.pool.started
        self.coordinator = self.pool.coordinator(layout.coordinator_cpus)
        self.hosts = [self.pool.host(h.cpus, h.gpus) for h in layout.hosts]
        if coord["data_parallel"] is not None or self.pool.started > started:
            # Idle actors of another layout (pooled on Ray Train lays hosts out differently) would hold the room
            # this run's new actors or its Ray Train workers need.
            self.pool.end_idle()
        # Ship big arrays once through the object store; actors (and restarted ones) read them zero-copy.
        for key in ("global_test", "global_val", "public"):
            common[key] = coord[key] = ray.put(common[key])
        loaded = [self.coordinator.load.remote(specs, **coord)]
        common["initial"] = self.coordinator.current_state.remote()  # every personal model starts here
        self.common = common
        by_index = {s.index: s for s in specs}
        self.order = {s.name: s.index for s in specs}
        # Kept for restarts: a replacement host gets the same institutions and shards from the object store.
        self.layout = [(h, ray.put([by_index[i] for i in h.indices]), ray.put([fed.shards[i] for i in h.indices]))
                       for h in layout.hosts]
        self.members = [{by_index[i].name for i in h.indices} for h in layout.hosts]
        # The global model is scored where there is a GPU: the coordinator reserves none, a GPU host scores it faster.
        self.scorer = next((j for j, h in enumerate(layout.hosts) if h.gpus > 0), None)
        self.backdoor = backdoor_of(specs)
        self.whole, self.pooled = pools_global(specs, fed), False
        self.carried: dict[str, dict] = {}  # name -> persistent state as of the last round (changed ones only)
        loaded += [self._load(j) for j in range(len(self.hosts))]
        self.pids = self._get(loaded, "the actors did not start", START_TIMEOUT_S)[1:]
        self.state_ref = None
        self.rounds, self.deadline = spec.rounds, spec.engine.round_deadline_s
        # The round's start (simulated); the next round as the last merge began it, (round, (context, start), state);
        # the hosts' training of that round, asked for already (host -> refs).
        self.began, self.ahead, self.training_ahead = 0.0, None, None
        self.scoring = None  # (plan, only, refs) of scoring asked for with the last merge
        self.broken = False  # a run that failed leaves actors no later run should trust

    def begin_round(self, round: int, sim_time: float) -> RoundContext:
        ahead, self.ahead = self.ahead, None
        # Begun by the last merge at the time the engine's clock reached? Then it is begun, and its hosts train it.
        if ahead is not None and ahead[0] == round and ahead[1][1] == sim_time:
            self.began, self.state_ref = sim_time, ahead[2]
            return ahead[1][0]
        if self.training_ahead is not None:  # the hosts train that round already: no other may begin
            raise RuntimeError(f"round {round} at {sim_time!r}: the hosts already train round {ahead and ahead[0]} "
                               f"as the coordinator began it, at {ahead and ahead[1][1]!r}")
        ctx_ref, self.state_ref = self.coordinator.begin_round.options(num_returns=2).remote(round, sim_time)
        self.began = sim_time
        return self._get(ctx_ref, f"round {round}: the coordinator could not start the round")

    def train_and_merge(self, ctx: RoundContext, score: bool = False, only: frozenset[str] | None = None
                        ) -> list[dict[str, Any]]:
        cohort = set(ctx.cohort)
        # Fan out to every host with a cohort member (asked already, behind the last round's scoring, when that round
        # began this one); the coordinator resolves the updates itself, and is asked to merge at once: if a host
        # fails, its result errors, so that merge fails without running and is asked again.
        ahead, self.training_ahead = self.training_ahead, None
        if ahead is not None and ahead[0] is not ctx:
            raise RuntimeError(f"round {ctx.round}: the hosts already train the round the last merge began")
        calls = ahead[1] if ahead is not None else self._train(ctx)
        merged = self._merge(ctx, {}, [c[0] for c in calls.values()])
        carried, failures = self._gather({j: c[1] for j, c in calls.items()})
        for saved in carried.values():
            self.carried.update(saved)
        lost = {}
        if failures:
            self._discard(merged)  # failed on the lost host's result, before merging anything
        for j, (status, error) in failures.items():
            names = sorted(self.members[j] & cohort, key=self.order.get)
            log.warning("round %d: %s %s (%s); their updates are lost this round and their host restarts",
                        ctx.round, ", ".join(names), status, error)
            lost |= dict.fromkeys(names, status)
            self._restart(j, list(calls[j]))
        if failures:
            refs = [c[0] for j, c in calls.items() if j not in failures]
            merged = self._merge(ctx, lost, refs)
        self.state_ref = merged[1]  # what everybody ends the round with: scored now, sent out next round
        if score:  # ordered after the merge on every actor: scoring starts while the rows travel back
            self.scoring = (ctx.plan, only, self._score(ctx.plan, only))
        rows = self._get(merged[0], f"round {ctx.round}: the coordinator failed to merge")
        if ctx.round < self.rounds:
            # The next round, as this merge began it: its hosts are asked to train now, each behind its scoring of
            # this round, so none waits for the driver to read this round's rows and scores.
            self.ahead = (ctx.round + 1, self._get(merged[2], f"round {ctx.round + 1}: the coordinator could not "
                                                               "start the round"), merged[1])
            self.training_ahead = (self.ahead[1][0], self._train(self.ahead[1][0]))
        return rows

    def _train(self, ctx: RoundContext) -> dict[int, tuple[Any, Any]]:
        """Ask every host with a member in ``ctx``'s cohort to train it from the current state: host -> (updates,
        carried state) refs."""
        cohort = set(ctx.cohort)
        return {j: h.train.options(num_returns=2).remote(ctx, self.state_ref)
                for j, (h, m) in enumerate(zip(self.hosts, self.members)) if m & cohort}

    def _merge(self, ctx: RoundContext, lost: dict[str, str], updates: list) -> list:
        """Refs of the merge's rows, the merged state and the next round, begun in the same call at the simulated
        time the engine's clock will reach (one round trip with the coordinator a round, not two)."""
        following = (ctx.round + 1, self.began, self.deadline) if ctx.round < self.rounds else None
        return self.coordinator.merge_and_begin.options(num_returns=3).remote(ctx, lost, following, *updates)

    def _score(self, plan: LocalPlan, only: frozenset[str] | None) -> tuple[Any, dict[int, Any]]:
        """Ask the coordinator and the hosts (those with someone in ``only``) to score the current global model."""
        state = self.state_ref  # the state now: after the last merge, or as the round began
        if self.pooled and only is None:
            glob = None  # pooled from the hosts' scores (evaluate), as the last scoring was
        elif self.scorer is None:
            glob = self.coordinator.evaluate.remote()
        else:  # the current global model, scored on the GPU host's device
            glob = self.hosts[self.scorer].score_global.remote(state, self.backdoor)
        return glob, {j: h.evaluate.remote(plan, state, only) for j, h in enumerate(self.hosts)
                      if only is None or self.members[j] & only}

    def evaluate(self, plan: LocalPlan, only: frozenset[str] | None = None):
        pending, self.scoring = self.scoring, None
        if not (pending and pending[0] is plan and pending[1] == only) and self.training_ahead is not None:
            raise RuntimeError("scoring asked for after the next round's training: it would score that round's models")
        glob, refs = pending[2] if pending and pending[0] is plan and pending[1] == only else self._score(plan, only)
        scores, failures = self._gather(refs)
        for j, (status, error) in failures.items():  # scoring changes nothing: restart and score again
            names = ", ".join(sorted(self.members[j], key=self.order.get))
            log.warning("scoring %s %s (%s); restarting their host", names, status, error)
            ahead = self.training_ahead[1] if self.training_ahead is not None else {}
            self._restart(j, [refs[j], *ahead.get(j, ())])
            scores[j] = self._get(self.hosts[j].evaluate.remote(plan, self.state_ref, only),
                                  "scoring on a restarted host failed")
            if j in ahead:  # the next round's training had gone to the lost host: the new one trains it
                ahead[j] = self.hosts[j].train.options(num_returns=2).remote(self.training_ahead[0], self.state_ref)
        every = Scores.concat([scores[j] for j in sorted(scores)])
        rows = every.in_scenario_order()
        pooled = rows.union() if self.whole and only is None else None
        if only is None:
            self.pooled = pooled is not None  # the next scoring of everybody asks the coordinator only if this one had to
        if pooled is not None:
            return pooled, rows
        if glob is None:
            glob = self.coordinator.evaluate.remote() if self.scorer is None else \
                self.hosts[self.scorer].score_global.remote(self.state_ref, self.backdoor)
        return self._get(glob, "the coordinator could not score"), rows

    def save(self) -> Snapshot:
        state, scheme = self._get(self.coordinator.snapshot.remote(), "the coordinator could not be checkpointed")
        return Snapshot(state, scheme, dict(self.carried))

    def restore(self, snapshot: Snapshot) -> None:
        self.carried = dict(snapshot.institutions)
        self._get(self.coordinator.restore.remote(snapshot.global_state, snapshot.scheme), "restoring the coordinator failed")
        self.ahead = self.training_ahead = None  # begun from the state before it
        self.pids = self._get([h.restore.remote(self._carried_by(j)) for j, h in enumerate(self.hosts)],
                              "restoring the hosts failed", START_TIMEOUT_S)

    def devices(self) -> list[str]:
        """Where each host trains ('cpu' or 'cuda:N')."""
        return self.ray.get([h.device.remote() for h in self.hosts])

    def close(self) -> None:
        """Hand the actors back to the pool (kept warm for the next run), or end them if the pool was this run's own."""
        if not self.broken:  # the coordinator's Ray Train job, if any, ends with the run
            try:
                self.ray.get(self.coordinator.close.remote(), timeout=START_TIMEOUT_S)
            except self.ray.exceptions.RayError as e:
                log.warning("ending the coordinator's Ray Train job failed (%s); ending the coordinator", _reason(e))
                self.broken = True
        if self.broken:
            for a in [self.coordinator, *self.hosts]:
                self.ray.kill(a)
        else:
            self.pool.give_back((self.coordinator_cpus, self.coordinator),
                                [((h.cpus, h.gpus), a) for (h, _, _), a in zip(self.layout, self.hosts)])
        if self.own_pool:
            self.pool.close()

    def _carried_by(self, j: int) -> dict[str, dict]:
        """What host ``j``'s institutions carry, for a host that starts afresh."""
        return {n: self.carried[n] for n in self.members[j] if n in self.carried}

    def _load(self, j: int):
        """Give host ``j`` its institutions at their starting state (a ref to its pid)."""
        _, specs, shards = self.layout[j]
        return self.hosts[j].load.remote(specs, shards, **self.common)

    def _restart(self, j: int, orphans: list) -> None:
        """Replace host ``j`` by a new actor holding the same shards and its institutions' carried state."""
        self.ray.kill(self.hosts[j], no_restart=True)
        self._discard(orphans)
        h = self.layout[j][0]
        self.hosts[j] = self.pool.new_host(h.cpus, h.gpus)
        started = [self._load(j), self.hosts[j].restore.remote(self._carried_by(j))]
        ready, _ = self.ray.wait(started, num_returns=2, timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(ready) < 2 and time.monotonic() < deadline:  # a lost node's room may be gone for good: say so soon
            self._check_room(j, started)
            ready, _ = self.ray.wait(started, num_returns=2, timeout=ROOM_CHECK_S)
        self.pids[j] = self._get(started, f"host {j} could not be restarted", START_TIMEOUT_S)[1]

    def _check_room(self, j: int, pending: list) -> None:
        """Stop the run with one line when the cluster no longer has the CPUs its actors ask for (a node left it)."""
        need = sum(h.cpus for h, _, _ in self.layout) + self.coordinator_cpus
        have = float(self.ray.cluster_resources().get("CPU", 0.0))
        if have + 1e-9 < need:
            self.broken = True
            self.ray.kill(self.hosts[j], no_restart=True)
            self._discard(pending)
            raise RunFailed(f"host {j} could not be restarted: the cluster now has {have:g} CPUs and this run's actors "
                            f"ask for {need:g} (a node left it)")

    def _discard(self, refs: list) -> None:
        """Collect a lost host's unfinished results (errors by now), so Ray does not report them as unhandled."""
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=10)
        for ref in ready:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError:
                pass

    def _gather(self, refs: dict[int, Any]) -> tuple[dict[int, Any], dict[int, tuple[str, str]]]:
        """Results by host within the deadline, and (status, error) of hosts that crashed or timed out."""
        ready, _ = self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout)
        ready = set(ready)
        results, failures = {}, {}
        for j, ref in refs.items():
            if ref not in ready:
                failures[j] = (faults.TIMEOUT, f"no answer within engine.round_timeout_s={self.timeout:g}")
                continue
            try:
                results[j] = self.ray.get(ref)  # finished already: returns at once
            except self.ray.exceptions.RayError as e:
                failures[j] = (faults.CRASHED, _reason(e))
        return results, failures

    def _get(self, refs, what: str, timeout: float | None = None):
        """``ray.get`` within the round deadline (or ``timeout`` if longer); a failure stops the run with one line."""
        limit = max(self.timeout, timeout or 0.0)
        try:
            return self.ray.get(refs, timeout=limit)
        except self.ray.exceptions.GetTimeoutError:
            self.broken = True
            raise RunFailed(f"{what}: no answer within {limit:g}s (engine.round_timeout_s)") from None
        except self.ray.exceptions.RayError as e:
            self.broken = True
            if isinstance(getattr(e, "cause", None), ConfigError):  # bad input found in an actor: the same one line
                raise e.cause from None                               # as in-process, no resume (it would fail alike)
            raise RunFailed(f"{what}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    """One line on what went wrong in an actor: its own exception if it raised, else Ray's verdict."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ActorError):  # already "Type: first line"
        return str(cause)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}".rstrip(": ")
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
