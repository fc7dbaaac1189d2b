"""A host carries one institution (cross-silo) or many (large populations).

``Host`` is plain Python so the in-process backend and the tests use it directly;
:mod:`agents.runtime.backend` wraps it as the Ray actor ``InstitutionHost`` with the resources
its placement asks for. A host owns one working torch model per architecture its institutions
train (the run's ``model``, and any a scenario row declares of its own) and lends it to each of
them in turn, so memory stays flat however many it carries.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from agents.coordinator import score_global
from agents.institution import Institution, client_of
from sim.core import stragglers
from sim.core.batched import ScoringRows, batchable, scorable, train_many
from sim.core.train import deterministic_cuda, scheduled
from sim.core.models import build_model, check_state_keys, fits, get_state, set_state
from sim.core.types import RUN_ARCH, InstitutionSpec, LocalPlan, RoundContext, Scores, Shard, State, TrainingSpec, Update


class Host:
    """Institutions that share one process, trained one after the other in scenario order."""

    def __init__(
        self,
        specs: Sequence[InstitutionSpec],
        shards: Sequence[Shard],
        *,
        model: Mapping[str, Any],
        shape: tuple[tuple[int, ...], int],
        training: TrainingSpec,
        seed: int,
        initial: State,
        global_test: tuple[np.ndarray, np.ndarray],
        global_val: tuple[np.ndarray, np.ndarray] | None = None,
        threads: int = 1,
        vectorise: bool = True,
        models: Mapping[str, Mapping[str, Any]] | None = None,
        public: np.ndarray | None = None,
    ):
        # A fixed thread count makes float reductions identical whatever the placement.
        torch.set_num_threads(threads)
        input_shape, num_classes = shape
        self.model = build_model(model, input_shape, num_classes, seed=seed)
        # One working model per architecture its institutions train (scenario rows' own ``model``), each lent in turn
        self.models = {RUN_ARCH: self.model} | {arch: build_model((models or {})[arch], input_shape, num_classes, seed=seed)
                                                for arch in sorted({s.arch for s in specs} - {RUN_ARCH})}
        if any(s.gpus > 0 for s in specs) and torch.cuda.is_available():
            deterministic_cuda()  # CPU kernels on a fixed thread count repeat already
            self.models = {arch: m.to("cuda") for arch, m in self.models.items()}
            self.model = self.models[RUN_ARCH]
        # Every institution starts from its architecture's seeded weights (the run's: the coordinator's starting state)
        starts = {arch: initial if arch == RUN_ARCH and fits(self.model, initial) else get_state(m)
                  for arch, m in self.models.items()}
        self.institutions = [
            Institution(s, shard, training=training, seed=seed, initial=starts[s.arch]) for s, shard in zip(specs, shards)
        ]
        for i in self.institutions:
            i.public = public
        self.names = [i.spec.name for i in self.institutions]  # a round picks by name: one pass, no attribute lookups
        self.index = np.array([i.spec.index for i in self.institutions], dtype=np.int64)  # what scores are keyed by
        self.one_arch = all(i.spec.arch == RUN_ARCH for i in self.institutions)  # nobody declares a model of their own
        self.global_test, self.global_val = global_test, global_val
        self.training = training
        self.vectorise = vectorise  # plain local steps and scoring of many small institutions run as one batched computation
        self._rows: ScoringRows | None = None  # every hosted test and validation row as one tensor, once scored together

    def ready(self) -> int:
        """The host's process id, once it is up (what the chaos tests signal)."""
        return os.getpid()

    def device(self) -> str:
        """Where this host trains: 'cpu' or 'cuda:N'."""
        return str(next(self.model.parameters()).device)

    def score_global(self, state: State, backdoor: tuple | None) -> dict[str, float]:
        """The global model's scores as the coordinator gives them, computed on this host's device (its GPU)."""
        return score_global(self.model, state, self.global_test, self.global_val, backdoor, self.training.precision)

    def train(self, ctx: RoundContext, global_state: State | None) -> tuple[list[Update], dict[str, dict[str, np.ndarray]]]:
        """Local step of each hosted institution in this round's cohort: their updates, and what they now carry.

        The second part (name -> persistent state, for those that changed) is what the
        backend keeps so that a restarted host can be given its institutions back.
        """
        cohort = set(ctx.cohort)
        trained = [i for i, name in zip(self.institutions, self.names) if name in cohort]
        client = client_of(ctx.plan)
        if trained and self.vectorise and client.batchable and ctx.plan.upload in ("weights", "nothing"):
            # Free-riders skip the step: they answer on their own, the others train together; scenario order kept.
            # DP-SGD institutions clip per sample: the vectorised step cannot, so they train on their own too.
            # Institutions of one architecture train together (one vectorised step per architecture).
            done = {}
            for arch, model in self.models.items():
                together = [i for i in trained if i.spec.arch == arch and not i.free_rides(ctx.plan)
                            and not i.spec.private]
                if together and batchable(model, self.training):
                    done |= dict(zip((i.spec.name for i in together),
                                     self._train_together(model, together, ctx, global_state)))
            updates = [done.get(i.spec.name) or i.train(self.models[i.spec.arch], ctx, global_state) for i in trained]
        else:
            updates = [i.train(self.models[i.spec.arch], ctx, global_state) for i in trained]
        for step in ctx.plan.send:  # the wrappers' client halves, in order: what leaves this process (compressed, masked)
            updates = [step(i, ctx, global_state, u) for i, u in zip(trained, updates)]
        return updates, self.persistent(trained)

    def _train_together(self, model: torch.nn.Module, trained: Sequence[Institution], ctx: RoundContext,
                        global_state: State | None) -> list[Update]:
        """One vectorised local step for all of ``trained`` (sim.core.batched), who all train ``model``'s
        architecture; compute time is shared out by samples."""
        plan, client = ctx.plan, client_of(ctx.plan)
        starts = [client.start(i, plan, client.received(i, global_state)) for i in trained]
        own = model.state_dict()
        for i, start in zip(trained, starts):  # what set_state would refuse, the vectorised step refuses too
            check_state_keys(own, start, i.spec.name)
        caps = [stragglers.cap(ctx, i.spec.name) for i in trained]  # partial stragglers stop early
        mu = client.pull()  # a proximal pull towards each start (FedProx), batched with the steps
        t0 = time.perf_counter()
        results = train_many(model, starts, [i.tensors(model) for i in trained],
                             [(i.seed, i.spec.index, ctx.round) for i in trained],
                             training=scheduled(self.training, ctx.round), mu=mu,
                             anchors=starts if mu > 0 else None, max_steps=caps)
        seconds = time.perf_counter() - t0
        total = max(1, sum(i.shard.num_train for i in trained))
        return [i.trained(plan, global_state, state, loss, seconds * i.shard.num_train / total,
                          None if cap is None else steps)
                for i, cap, (state, loss, steps) in zip(trained, caps, results)]

    def persistent(self, institutions: Sequence[Institution] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Name -> persistent state of the hosted institutions (all by default) whose state changed."""
        return {i.spec.name: p for i in (self.institutions if institutions is None else institutions)
                if (p := i.persistent())}

    def restore(self, saved: Mapping[str, Mapping[str, np.ndarray]]) -> int:
        """Give hosted institutions back their persistent state (after a restart or from a checkpoint); returns the pid."""
        for i in self.institutions:
            i.restore(saved.get(i.spec.name, {}))
        return os.getpid()

    def evaluate(self, plan: LocalPlan, global_state: State | None, only: frozenset[str] | None = None) -> Scores:
        """Each hosted institution's (or only those named in ``only``) test scores for the model it ends the round with."""
        if only is None:
            picked = None
            chosen = self.institutions
        else:
            picked = np.array([k for k, n in enumerate(self.names) if n in only], dtype=np.int64)
            chosen = [self.institutions[k] for k in picked]
        if (chosen and global_state and self.vectorise and plan.evaluate != "personal"
                and not client_of(plan).adapts and scorable(self.model, self.training.precision)
                and (self.one_arch or all(i.spec.arch == RUN_ARCH for i in chosen))):
            return self._evaluate_together(picked, global_state)
        seen: dict[str, dict[str, float]] = {}  # identical personal models are scored on the global sets once
        return Scores.of([(i.spec.index, i.evaluate(self.models[i.spec.arch], plan, global_state, self.global_test,
                                                   self.global_val, seen)) for i in chosen])

    def _evaluate_together(self, picked: np.ndarray | None, global_state: State) -> Scores:
        """Everybody scores the merged model on its own test (and validation) split: one pass over all their rows,
        kept as one tensor from the first round on (sim.core.batched.ScoringRows)."""
        set_state(self.model, global_state)
        n = len(self.institutions)
        if self._rows is None:
            first = next(self.model.parameters())
            sets = [(i.shard.x_test, i.shard.y_test) for i in self.institutions]
            sets += [(i.shard.x_val, i.shard.y_val) if i.shard.y_val is not None else (i.shard.x_test[:0], i.shard.y_test[:0])
                     for i in self.institutions]
            self._rows = ScoringRows(sets, first.device, first.dtype)
        which = None if picked is None else np.concatenate([picked, picked + n])  # their test sets, then their validation
        acc, loss, right, total = self._rows.score(self.model, which)
        k = len(acc) // 2
        index = self.index if picked is None else self.index[picked]
        sizes = (self._rows.sizes if which is None else self._rows.sizes[which]).astype(float)
        has_val = sizes[k:] > 0
        columns = {"accuracy": acc[:k], "loss": loss[:k], "val_accuracy": acc[k:], "val_loss": loss[k:]}
        has = {} if has_val.all() else {"val_accuracy": has_val, "val_loss": has_val}
        if not has_val.any():
            del columns["val_accuracy"], columns["val_loss"]
            has = {}
        # The sums behind the means: the union of everybody's sets (the global test set) is scored from them exactly.
        columns |= {f"{part}_{what}": values[sl] for part, sl in (("test", slice(None, k)), ("val", slice(k, None)))
                    for what, values in (("right", right), ("rows", sizes), ("loss_sum", total))}
        return Scores(index, columns, has)
