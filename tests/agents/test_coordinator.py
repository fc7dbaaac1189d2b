"""The coordinator: merges in scenario order whatever order updates arrive in, and books who sent nothing."""

import random

import numpy as np
import pytest

from agents.runtime.backend import InProcessBackend
from sim.checks import load_spec
from sim.core.data import build_federation


def fresh(spec, fed):
    return InProcessBackend(spec, spec.scenario.institutions, fed, flops=1000)


def merged_round(spec):
    """An in-process backend after one round trained and merged, its data, and the round's context."""
    fed = build_federation(spec.data, spec.scenario, spec.seed, smoke=True)
    backend = fresh(spec, fed)
    ctx = backend.begin_round(1, 0.0)
    updates, _ = backend.host.train(ctx, backend.state)
    backend.coordinator.merge(ctx, {}, updates)
    return backend, fed, ctx


def test_merge_does_not_depend_on_the_order_updates_arrive_in(small_cfg):
    # Prepare: one round's updates, then the same updates arriving in other orders and groupings
    spec = load_spec(small_cfg())
    fed = build_federation(spec.data, spec.scenario, spec.seed, smoke=True)
    first = fresh(spec, fed)
    ctx = first.begin_round(1, 0.0)
    updates, _ = first.host.train(ctx, first.state)
    shuffled = list(updates)
    random.Random(0).shuffle(shuffled)
    arrivals = [[updates], [updates[::-1]], [[u] for u in shuffled], [shuffled[:2], shuffled[2:]]]
    # Execute: each arrival pattern merged by a fresh coordinator
    merged = []
    for lists in arrivals:
        backend = fresh(spec, fed)
        backend.begin_round(1, 0.0)
        rows = backend.coordinator.merge(ctx, {}, *lists)
        merged.append((backend.coordinator.current_state(), rows))
    # Assert: bit-identical global state and identical ledger rows
    state0, rows0 = merged[0]
    for state, rows in merged[1:]:
        assert all(np.array_equal(state[k], state0[k]) for k in state0)
        assert rows == rows0


def test_lost_members_are_booked_with_their_status(small_cfg):
    spec = load_spec(small_cfg())
    backend = fresh(spec, build_federation(spec.data, spec.scenario, spec.seed, smoke=True))
    ctx = backend.begin_round(1, 0.0)
    updates, _ = backend.host.train(ctx, backend.state)
    rows = backend.coordinator.merge(ctx, {"rural_clinic": "crashed", "credit_union": "timeout"},
                                     [u for u in updates if u.institution not in ("rural_clinic", "credit_union")])
    status = {r["institution"]: (r["status"], r["participated"], r["bytes_down"] > 0) for r in rows}
    assert status["rural_clinic"] == ("crashed", False, True) and status["credit_union"] == ("timeout", False, True)
    assert status["city_hospital"] == ("ok", True, True)


def test_a_host_scores_the_global_model_exactly_as_the_coordinator_does(small_cfg):
    # Prepare: one round trained and merged, with a data-poisoning institution so the backdoor is scored too
    backend, _, _ = merged_round(load_spec(small_cfg("+scenario.institutions.0.behaviour=data_poisoning")))
    # Execute: the coordinator's scores, and a host's (what a GPU host computes in its place on Ray)
    own = backend.coordinator.evaluate()
    hosted = backend.host.score_global(backend.coordinator.current_state(), backend.coordinator.backdoor)
    # Assert: the same numbers, backdoor included
    assert backend.coordinator.backdoor is not None and "backdoor_success" in own
    assert hosted == own


def test_identical_personal_models_are_scored_on_the_global_sets_once_with_the_same_numbers(small_cfg, monkeypatch):
    # Prepare: isolated training, round 0: every institution's own model is the same starting model
    import agents.institution as institution

    spec = load_spec(small_cfg("scheme=isolated"))
    fed = build_federation(spec.data, spec.scenario, spec.seed, smoke=True)
    backend = fresh(spec, fed)
    ctx = backend.begin_round(1, 0.0)
    calls, real = [], institution.evaluate
    monkeypatch.setattr(institution, "evaluate", lambda model, x, y, **kw: calls.append(len(y)) or real(model, x, y, **kw))
    # Execute: scored with the memo (as hosts score), then each institution alone
    names = [s.name for s in spec.scenario.institutions]
    together = [(names[k], row) for k, row in backend.host.evaluate(ctx.plan, backend.state).rows()]
    on_global = calls.count(len(fed.y_test))
    alone = [(i.spec.name, i.evaluate(backend.host.model, ctx.plan, backend.state, backend.host.global_test,
                                      backend.host.global_val)) for i in backend.host.institutions]
    # Assert: the global test set scored once, not once per institution; every number the same
    assert len(backend.host.institutions) > 1 and on_global == 1
    assert together == alone


def test_the_global_row_is_pooled_from_everybodys_scores_as_the_coordinator_would_score_it(small_cfg):
    # Prepare: one merged round of FedAvg in-process; the hosts score everybody with the merged model
    from agents.runtime.backend import pools_global

    spec = load_spec(small_cfg())
    backend, fed, ctx = merged_round(spec)
    # Execute: the global row as the engine gets it (pooled), and the coordinator's own pass over the global sets
    pooled, each = backend.evaluate(ctx.plan)
    own = backend.coordinator.evaluate()
    # Assert: accuracies exactly the coordinator's; losses to float rounding (summed in float64, not float32 chunks)
    assert pools_global(tuple(spec.scenario.institutions), fed) and len(each.index) == len(fed.shards)
    assert set(pooled) == set(own) == {"accuracy", "loss", "val_accuracy", "val_loss"}
    for metric in own:
        assert pooled[metric] == (own[metric] if "accuracy" in metric else pytest.approx(own[metric], rel=1e-6))
    # ... and a coalition's global row (the global sets hold non-members' rows too) is the coordinator's own
    members = tuple(spec.scenario.institutions[:2])
    part = InProcessBackend(spec.restrict(tuple(s.name for s in members)), members, fed, flops=1000)
    assert part.evaluate(part.begin_round(1, 0.0).plan)[0] == part.coordinator.evaluate()
