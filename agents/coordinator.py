"""The coordinator: holds the global state, asks the scheme to select and merge, keeps the ledger.

Plain Python; :mod:`agents.runtime.backend` runs it as a Ray actor. Updates are merged in
scenario order whatever order they arrive in, so results do not depend on timing. The
fault model (:mod:`sim.core.faults`) is applied here, after the scheme has chosen its cohort,
so the scheme merges only what arrived and the ledger says why the rest did not.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from agents.schemes.base import Books, Central, Distils, cost_of
from agents.wrappers import build
from sim.core import clock, faults, stragglers
from sim.core.data import corruption
from sim.core.models import build_model, fits, get_state, model_flops, set_state
from sim.core.train import evaluate, local_train, lr_scale, scheduled
from sim.core.types import GLOBAL, IDLE_ROWS, RUN_ARCH, ConfigError, InstitutionSpec, RoundContext, State, TrainingSpec, Update, state_nbytes


def backdoor_of(specs: Sequence[InstitutionSpec]) -> tuple | None:
    """(trigger features, trigger value, target label) of the first data-poisoning institution's backdoor, or None."""
    return next(((s.trigger_features, s.trigger_value, s.target_label) for s in specs
                 if s.behaviour == "data_poisoning"), None)


def score_global(model: Any, state: State, global_test: tuple[np.ndarray, np.ndarray],
                 global_val: tuple[np.ndarray, np.ndarray] | None, backdoor: tuple | None, precision: str,
                 ) -> dict[str, float]:
    """The global model's scores: accuracy and loss on the global test set (and validation set), and the success of a
    planted backdoor (BadNets' attack success rate on the global test rows not of the target class, triggered; NaN when
    there are none). The coordinator runs it, or a host with a GPU (the same numbers, on its device). Nothing when the
    global state is not one model of the run's architecture (FedDF's one per architecture, FedMD's consensus scores):
    the engine then reports the mean of the institutions' own models on the global sets, as for isolated training."""
    if not fits(model, state):
        return {}
    set_state(model, state)
    acc, loss = evaluate(model, *global_test, precision=precision)
    out = {"accuracy": acc, "loss": loss}
    if global_val is not None and len(global_val[1]):
        out["val_accuracy"], out["val_loss"] = evaluate(model, *global_val, precision=precision)
    if backdoor is not None:
        features, value, target = backdoor
        x, y = global_test
        victims = np.asarray(y) != target
        out["backdoor_success"] = float("nan")
        if victims.any():
            triggered = corruption.add_trigger(np.asarray(x)[victims], features, value)
            out["backdoor_success"], _ = evaluate(
                model, triggered, np.full(int(victims.sum()), target, dtype=np.asarray(y).dtype), precision=precision)
    return out


class Coordinator:
    """The consortium's server: global model, scheme, and who sent what."""

    def __init__(
        self,
        specs: Sequence[InstitutionSpec],
        *,
        scheme: Mapping[str, Any],
        wrappers: Mapping[str, Mapping[str, Any]] | None = None,
        model: Mapping[str, Any],
        shape: tuple[tuple[int, ...], int],
        training: TrainingSpec,
        seed: int,
        global_test: tuple[np.ndarray, np.ndarray],
        flops_per_sample: int,
        global_val: tuple[np.ndarray, np.ndarray] | None = None,
        threads: int = 1,
        deadline: stragglers.Deadline | None = None,
        models: Mapping[str, Mapping[str, Any]] | None = None,
        public: np.ndarray | None = None,
    ):
        torch.set_num_threads(threads)
        self.specs = {s.name: s for s in specs}
        self.position = {name: i for i, name in enumerate(self.specs)}  # the run's institutions in scenario order
        self.seed = seed
        self.training = training
        self.model = build_model(model, shape[0], shape[1], seed=seed)
        self.state: State = get_state(self.model)
        self.global_test, self.global_val = global_test, global_val
        self.flops = flops_per_sample
        # (samples processed, wall seconds, the institutions whose pooled data and compute it ran on) this round
        self.central_work: list[tuple[int, float, tuple[InstitutionSpec, ...]]] = []
        self.scheme = build(scheme, wrappers)  # the scheme in its wrappers (robust rule, secure aggregation, ...)
        # Central training as a data-parallel job (a callable like _train_central's own step, with close()): the Ray
        # runtime's coordinator sets it (agents/runtime/warm.py); None trains here, in this process.
        self.data_parallel: Any = None
        if isinstance(self.scheme, Central):  # pooled data: the scheme trains here
            self.scheme.bind(self._train_central)
        # A backdoor planted by a data-poisoning institution (the first one's trigger): scored on the global test set.
        self.backdoor = backdoor_of(specs)
        self.deadline = deadline  # per-round slowdowns and engine.round_deadline_s (sim/core/stragglers.py)
        if isinstance(self.scheme, Books):  # compute sharing: it plans who trains whose data
            self.scheme.attach(tuple(specs), row_bytes=_row_bytes(global_test))
        # Institutions of their own architecture: their compute is charged at their own model's multiply-adds
        configs = {RUN_ARCH: model, **(models or {})}
        builder = lambda arch: build_model(configs[arch], shape[0], shape[1], seed=seed)  # noqa: E731
        own = {arch: model_flops(builder(arch), shape[0]) for arch in sorted({s.arch for s in specs} - {RUN_ARCH})}
        self.flops_of = {s.name: own.get(s.arch, flops_per_sample) for s in specs}
        if isinstance(self.scheme, Distils):  # knowledge distillation: the public set and a model per architecture
            if public is None:
                raise ConfigError("data.public", f"scheme {self.scheme.name} distils on an unlabeled public set; set "
                                  "data.public={source: heldout, rows: N}")
            start = self.scheme.attach_public(public, builder, {s.name: s.arch for s in specs}, self.state)
            if start is not None:
                self.state = {k: np.asarray(v) for k, v in start.items()}

    def current_state(self) -> State:
        """The global state now (before round 1: also every institution's starting personal model)."""
        return self.state

    def begin_round(self, round: int, sim_time: float) -> tuple[RoundContext, State]:
        """This round's context (who trains, who drops out, the local plan) and the global state to send out."""
        everyone = RoundContext(round=round, seed=self.seed, cohort=tuple(self.specs))
        selected = tuple(self.scheme.select(everyone))
        dropped = faults.dropped(self.specs, selected, self.seed, round)
        out = {name for name, _ in dropped}
        ctx = replace(everyone, cohort=tuple(n for n in selected if n not in out), plan=self.scheme.plan(round),
                      sim_time=sim_time, dropped=dropped,
                      server_scale=lr_scale(self.training.server_schedule, round, self.training))
        if self.deadline is not None:  # stragglers: slowed, late (out of the cohort) or capped to partial work
            ctx = self.deadline.apply(ctx, self.specs, state_nbytes(self.state), self.scheme.stragglers)
        return ctx, self.state

    def merge(self, ctx: RoundContext, lost: dict[str, str], *update_lists: Sequence[Update]) -> list[dict[str, Any]]:
        """Merge what arrived (in scenario order) and return the round's ledger rows.

        ``lost`` names cohort members whose host crashed or timed out (status per name).
        """
        # The merge reads what crossed (compressed, say: its wrapper restores it); the ledger keeps the bytes that crossed.
        updates = sorted((u for lst in update_lists for u in lst), key=lambda u: u.index)
        sent = state_nbytes(self.state) if ctx.plan.start == "global" else 0  # what a dropped member had received
        self.central_work = []
        rows = [self._ledger_row(stragglers.slowed(self.specs[u.institution], ctx), u,
                                 stragglers.work_done(ctx, u.institution)) for u in updates]
        ctx = replace(ctx, seconds=tuple((row["institution"], row["simulated_seconds"]) for row in rows))
        merged = self.scheme.merge(ctx, self.state, updates)
        if merged is not None:
            self.state = {k: np.asarray(v) for k, v in merged.items()}
        cost = cost_of(self.scheme, ctx, updates)  # extra bytes; asynchronous: when the round ends; epsilon spent
        end, staleness, extras, epsilon = cost.end, cost.staleness, cost.extras, cost.epsilon
        arrived = {u.institution for u in updates}
        status = dict(ctx.dropped) | dict(lost)
        # Institutions simply not picked this round all have the same row: they go as positions (see IDLE_ROWS),
        # found with an array mask, so a round's cost here follows the cohort, not the population.
        if self.scheme.books_idle:  # the scheme's book() changes absent institutions' rows: every one gets a row
            loud, idle = [n for n in self.specs if n not in arrived], ()
        else:
            said = (set(status) | set(extras) | set(staleness)) & self.specs.keys()
            loud = sorted(said - arrived, key=self.position.__getitem__)
            quiet = np.ones(len(self.specs), dtype=bool)
            quiet[[self.position[n] for n in arrived | set(loud)]] = False
            idle = tuple(np.flatnonzero(quiet).tolist())
        rows += [_absent(self.specs[n], status.get(n, faults.IDLE), sent) for n in loud]
        for row in rows:
            if row["institution"] in staleness:
                row["staleness"] = float(staleness[row["institution"]])
        for row in rows:
            _book(self.specs[row["institution"]], row, extras.get(row["institution"]))
            if epsilon == epsilon:  # NaN (no privacy noise): the engine's default stands
                row["epsilon"] = epsilon  # client-level DP: every institution's guarantee is the same
        if isinstance(self.scheme, Books):  # compute_share moves a taker's training to its giver's row and clock
            self.scheme.book(ctx, rows)
        samples = sum(s for s, _, _ in self.central_work)
        # Central training runs on the combined compute of the institutions whose data it trains on.
        central = sum(clock.TRAIN_COST * s * self.flops / sum(map(clock.flops_rate, by)) for s, _, by in self.central_work)
        rows.append({
            "institution": GLOBAL, "participated": bool(self.central_work), "bytes_up": 0, "bytes_down": 0,
            "compute_seconds": sum(w for _, w, _ in self.central_work), "samples": samples,
            "simulated_seconds": central,
            "sim_compute_seconds": central,
            "status": faults.OK if self.central_work else faults.IDLE, "work_done": float(bool(self.central_work)),
            IDLE_ROWS: (idle, epsilon if epsilon == epsilon else None),  # None, not NaN: rows compare equal
        } | ({} if end is None else {"round_end": end}))  # the engine's clock reads round_end and drops it
        return [_unshared(row) for row in rows]

    def merge_and_begin(self, ctx: RoundContext, lost: dict[str, str],
                        following: tuple[int, float, float | None] | None,
                        *update_lists: Sequence[Update]) -> tuple[list[dict[str, Any]], State, Any]:
        """:meth:`merge`, then, with ``following`` = (next round, this round's start, engine.round_deadline_s), begin
        the next round at the simulated time the engine's clock will reach (:func:`sim.core.stragglers.round_end`): a
        remote driver's next :meth:`begin_round` is then already answered. Returns (rows, the merged state, (next
        round's context, its start time) or None)."""
        rows = self.merge(ctx, lost, *update_lists)
        ahead = None
        if following is not None:
            round, start, deadline = following
            began = stragglers.round_end(rows, start, deadline)
            ahead = (self.begin_round(round, began)[0], began)
        return rows, self.state, ahead

    def snapshot(self) -> tuple[State, dict[str, np.ndarray]]:
        """The global state and the scheme's own state, for a checkpoint."""
        return self.state, self.scheme.state()

    def restore(self, state: State, scheme_state: dict[str, np.ndarray]) -> None:
        """Continue from a checkpoint's global and scheme state."""
        self.state = {k: np.asarray(v) for k, v in state.items()}
        self.scheme.load_state(scheme_state)

    def evaluate(self) -> dict[str, float]:
        """Accuracy and loss of the global model on the global test set (and the global validation set)."""
        return score_global(self.model, self.state, self.global_test, self.global_val, self.backdoor,
                            self.training.precision)

    def close(self) -> None:
        """End what outlives a round (a Ray Train job) so its resources are free for the next run."""
        if self.data_parallel is not None:
            self.data_parallel.close()

    def _train_central(self, state: State, x: np.ndarray, y: np.ndarray, key: tuple[int, ...],
                       parts: Sequence[tuple[int, int]] | None = None) -> tuple[State, float]:
        """The Trainer a scheme may use to train on data held centrally (``parts``: whose rows, in order)."""
        t0 = time.perf_counter()
        round = key[1] if len(key) > 1 else 0
        if self.data_parallel is not None:
            new, loss = self.data_parallel(state, x, y, key, parts)
        else:
            set_state(self.model, state)
            loss, _ = local_train(self.model, x, y, training=scheduled(self.training, round), key=key)
            new = get_state(self.model)
        by_index = {s.index: s for s in self.specs.values()}
        by = tuple(by_index[i] for i, n in parts or () if n) or tuple(self.specs.values())
        self.central_work.append((self.training.local_epochs * len(y), time.perf_counter() - t0, by))
        return new, loss

    def _ledger_row(self, spec: InstitutionSpec, u: Update, work_done: float = 1.0) -> dict[str, Any]:
        """Ledger entry of one update that arrived (``spec`` at this round's speed; ``work_done`` of its planned work)."""
        compute = clock.compute_seconds(spec, u.samples_processed, self.flops_of.get(spec.name, self.flops))
        return {
            "institution": u.institution, "participated": True, "bytes_up": u.bytes_up, "bytes_down": u.bytes_down,
            "compute_seconds": u.compute_seconds, "samples": u.num_samples, "train_loss": u.train_loss,
            "simulated_seconds": compute + clock.transfer_seconds(spec, u.bytes_up, u.bytes_down),
            "sim_compute_seconds": compute,
            "status": faults.OK, "work_done": work_done, "epsilon": u.epsilon,  # DP-SGD's own; NaN (the default) without it
        }


def _book(spec: InstitutionSpec, row: dict[str, Any], extra: Mapping[str, float] | None) -> None:
    """Add a scheme's extra bytes and round trips (secure aggregation) to a ledger row, and the time they take:
    the extra bytes over the link plus one latency each way per extra round trip."""
    if not extra:
        return
    up, down = int(extra.get("bytes_up", 0)), int(extra.get("bytes_down", 0))
    row["bytes_up"] += up
    row["bytes_down"] += down
    row["simulated_seconds"] += ((up + down) * 8 / (spec.bandwidth_mbps * 1e6)
                                 + 2 * extra.get("round_trips", 0) * spec.latency_s)


def _unshared(row: dict[str, Any]) -> dict[str, Any]:
    """Fill the compute-sharing columns a scheme left out: trained on its own compute, nothing moved or lent."""
    return {"trained_by": row["institution"], "data_bytes": 0, "compute_given_seconds": 0.0,
            "compute_taken_seconds": 0.0, "solo_seconds": row["simulated_seconds"]} | row


def _row_bytes(data: tuple[np.ndarray, np.ndarray]) -> int:
    """Bytes of one raw training row (inputs and label), read off the global test set of the same dtypes."""
    x, y = data
    return int(x[:1].nbytes + y[:1].nbytes) if len(y) else 0


def _absent(spec: InstitutionSpec, status: str, sent: int) -> dict[str, Any]:
    """Ledger entry of an institution whose update did not arrive: not selected, offline, failed or lost.

    Members that failed, were lost mid-round or were late (stragglers dropped at the deadline)
    had already received the global state (``sent`` bytes), so the download is booked; offline
    or unselected ones cost nothing.
    """
    down = sent if status in (faults.FAILED, faults.CRASHED, faults.TIMEOUT, faults.LATE) else 0
    return {"institution": spec.name, "participated": False, "bytes_up": 0, "bytes_down": down,
            "compute_seconds": 0.0, "samples": 0, "simulated_seconds": clock.transfer_seconds(spec, 0, down),
            "sim_compute_seconds": 0.0,
            "status": status, "work_done": 0.0}
