"""Asynchronous schemes (FedAsync, FedBuff): arrival order on the simulated clock, staleness weights, state, runs."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from agents.schemes.asynchronous import staleness_weight
from agents.schemes.fedasync import FedAsync
from agents.schemes.fedbuff import FedBuff
from sim.cli import compose
from sim.checks import load_spec
from sim.engine import run
from sim.core.types import ConfigError, RoundContext, Update
from stopping import resume_matches_straight

NAMES = ("a", "b", "c")
SMALL = ["smoke=true", "rounds=6", "data.num_samples=600", "scenario.speed=1"]
F64 = 1e-12  # float64 maths on float32 states: exact up to the cast back to float32 (checked with this slack)


def ctx(round: int, sim_time: float, seconds: dict[str, float] = {}) -> RoundContext:
    return RoundContext(round=round, seed=0, cohort=NAMES, sim_time=sim_time, seconds=tuple(seconds.items()))


def update(name: str, w: list[float]) -> Update:
    return Update(institution=name, index=NAMES.index(name), state={"w": np.array(w, np.float64)}, num_samples=1,
                  train_loss=0.0, compute_seconds=0.0, bytes_up=0)


def step(scheme, r: int, t: float, state: dict, sent: dict[str, tuple[float, list[float]]]):
    """One round: dispatch ``sent`` (name -> (seconds, weights)), merge; return (new state, round end, staleness)."""
    seconds = {n: s for n, (s, _) in sent.items()}
    new = scheme.merge(ctx(r, t, seconds), state, [update(n, w) for n, (_, w) in sent.items()])
    cost = scheme.cost(ctx(r, t, seconds), [])
    return (state if new is None else new), cost.end, dict(cost.staleness)


# --- staleness functions: against a hand computation -------------------------------------


@pytest.mark.parametrize("lag, kind, a, b, expected", [
    (0, "polynomial", 0.5, 0, 1.0),
    (3, "polynomial", 0.5, 0, 0.5),  # (3 + 1)^-0.5: FedBuff's 1 / sqrt(1 + 3)
    (7, "polynomial", 1.0, 0, 0.125),
    (9, "constant", 0.5, 0, 1.0),
    (4, "hinge", 1.0, 4, 1.0),  # still forgiven at lag b
    (6, "hinge", 1.0, 4, 1 / 3),  # 1 / (1 * (6 - 4) + 1)
    (14, "hinge", 0.5, 4, 1 / 6),  # 1 / (0.5 * 10 + 1)
])
def test_staleness_weights_match_the_formulas(lag, kind, a, b, expected) -> None:
    assert staleness_weight(lag, kind, a, b) == pytest.approx(expected, rel=1e-15)


def test_an_update_from_the_future_is_refused() -> None:
    with pytest.raises(ValueError, match="future"):
        staleness_weight(-1, "polynomial", 0.5, 0)


# --- ordering by simulated time, and the merge maths ---------------------------------------


def test_fedasync_merges_one_arrival_per_round_in_simulated_time_order_ties_in_scenario_order() -> None:
    # Prepare: all three dispatched at t=0; c and b take 1 s (a tie), a takes 3 s
    scheme, g = FedAsync(alpha=0.5, staleness="polynomial", staleness_a=1.0), {"w": np.zeros(1)}
    assert scheme.select(ctx(1, 0.0)) == NAMES
    # Execute / Assert: round 1 takes b (scenario order breaks the tie with c), the clock moves to 1 s
    g, end, stale = step(scheme, 1, 0.0, g, {"a": (3.0, [8.0]), "b": (1.0, [2.0]), "c": (1.0, [4.0])})
    assert (end, stale) == (1.0, {"b": 0.0})
    np.testing.assert_allclose(g["w"], [0.5 * 2.0], rtol=0, atol=F64)  # (1 - 0.5) * 0 + 0.5 * 2
    # Round 2: only b is idle; it goes again (2 s) from the new model; c (lag 1) arrives, the clock stays at 1 s
    assert scheme.select(ctx(2, 1.0)) == ("b",)
    g, end, stale = step(scheme, 2, 1.0, g, {"b": (2.0, [6.0])})
    alpha = 0.5 * (1 + 1) ** -1.0
    np.testing.assert_allclose(g["w"], [(1 - alpha) * 1.0 + alpha * 4.0], rtol=0, atol=F64)
    assert (end, stale) == (1.0, {"c": 1.0})
    # Round 3: c goes again (5 s, arrives at 6); a (3.0) and b's second update (3.0) tie: a first, scenario order
    assert scheme.select(ctx(3, 1.0)) == ("c",)
    before = g["w"].copy()
    g, end, stale = step(scheme, 3, 1.0, g, {"c": (5.0, [0.0])})
    assert (end, stale) == (3.0, {"a": 2.0})  # a trained from version 0, two steps ago
    alpha = 0.5 * (2 + 1) ** -1.0
    np.testing.assert_allclose(g["w"], (1 - alpha) * before + alpha * 8.0, rtol=0, atol=F64)
    # Round 4: b's second update left at version 1 and lands at version 3
    g, end, stale = step(scheme, 4, 3.0, g, {"a": (1.0, [0.0])})
    assert (end, stale) == (3.0, {"b": 2.0})
    assert scheme.version == 4


def test_fedbuff_steps_once_every_k_arrivals_by_the_staleness_weighted_sum_over_k() -> None:
    # Prepare: K = 2, server_lr 0.5; changes of +1 (a), +3 (b), +5 (c) from w = 10
    scheme, g = FedBuff(buffer_size=2, server_lr=0.5), {"w": np.array([10.0])}
    # Execute: a (1 s) arrives first: buffered, the model stays
    new, end, stale = step(scheme, 1, 0.0, g, {"a": (1.0, [11.0]), "b": (2.0, [13.0]), "c": (4.0, [15.0])})
    assert new is g and (end, stale) == (1.0, {"a": 0.0})
    # a goes again from the same model (change -1, 1.5 s: arrives at 2.5); b arrives at 2 and fills the buffer
    g, end, stale = step(scheme, 2, 1.0, g, {"a": (1.5, [9.0])})
    assert (end, stale) == (2.0, {"b": 0.0})
    np.testing.assert_allclose(g["w"], [10.0 + 0.5 * (1.0 + 3.0) / 2], rtol=0, atol=F64)
    # Round 3: a's second change left at version 0, lands at version 1: buffered with weight 1 / sqrt(2)
    g2, end, stale = step(scheme, 3, 2.0, g, {"b": (9.0, [0.0])})
    assert g2 is g and (end, stale) == (2.5, {"a": 1.0})
    # Round 4: c (left at version 0) fills the buffer: the step is the weighted sum over K
    g3, end, stale = step(scheme, 4, 2.5, g, {"a": (9.0, [0.0])})
    assert (end, stale) == (4.0, {"c": 1.0})
    s = 2 ** -0.5
    np.testing.assert_allclose(g3["w"], g["w"] + 0.5 * (s * -1.0 + s * 5.0) / 2, rtol=0, atol=F64)


def test_only_idle_institutions_are_dispatched_up_to_the_concurrency() -> None:
    # Prepare: two may train at once
    scheme = FedAsync(concurrency=2)
    # Execute / Assert: a seeded pick of two out of three, then only the freed one's slot
    first = scheme.select(ctx(1, 0.0))
    assert len(first) == 2 and first == tuple(sorted(first, key=NAMES.index))
    assert first == FedAsync(concurrency=2).select(ctx(1, 0.0))  # fixed by (seed, round)
    step(scheme, 1, 0.0, {"w": np.zeros(1)}, {first[0]: (1.0, [1.0]), first[1]: (2.0, [1.0])})
    second = scheme.select(ctx(2, 1.0))
    assert len(second) == 1 and first[1] not in second


def test_a_checkpointed_queue_and_buffer_continue_exactly() -> None:
    # Prepare: a FedBuff mid-run (one change buffered, two in flight), and a copy restored from its state
    scheme, g = FedBuff(buffer_size=2), {"w": np.array([1.0, 2.0])}
    step(scheme, 1, 0.0, g, {"a": (1.0, [2.0, 2.0]), "b": (3.0, [0.0, 5.0]), "c": (2.0, [1.0, 1.0])})
    restored = FedBuff(buffer_size=2)
    restored.load_state(copy.deepcopy(scheme.state()))
    # Execute: both go on alike
    sends = {2: {"a": (0.5, [3.0, 3.0])}, 3: {}, 4: {}}
    runs = [[step(s, r, 1.0, g, sent) for r, sent in sends.items()] for s in (scheme, restored)]
    # Assert
    for (x, end_x, st_x), (y, end_y, st_y) in zip(*runs):
        np.testing.assert_array_equal(x["w"], y["w"])
        assert (end_x, st_x) == (end_y, st_y)


# --- bad input: one line naming the key, before any actor starts ---------------------------


@pytest.mark.parametrize("overrides, key", [
    (["scheme=fedasync", "scheme.alpha=0"], "scheme.alpha"),
    (["scheme=fedasync", "scheme.alpha=1.5"], "scheme.alpha"),
    (["scheme=fedasync", "scheme.staleness=linear"], "scheme.staleness"),
    (["scheme=fedasync", "scheme.staleness_a=-1"], "scheme.staleness_a"),
    (["scheme=fedasync", "scheme.concurrency=7"], "scheme.concurrency"),  # six institutions
    (["scheme=fedbuff", "scheme.buffer_size=7"], "scheme.buffer_size"),
    (["scheme=fedbuff", "scheme.buffer_size=3", "scheme.concurrency=2"], "scheme.buffer_size"),
    (["scheme=fedbuff", "scheme.server_lr=0"], "scheme.server_lr"),
    (["scheme=fedbuff", "engine.round_deadline_s=5"], "engine.round_deadline_s"),  # no round waits: nothing to miss
])
def test_bad_async_settings_fail_before_any_actor_with_the_key(overrides, key) -> None:
    with pytest.raises(ConfigError) as e:
        load_spec(compose("config", SMALL + overrides))
    assert e.value.key == key and "\n" not in str(e.value)


# --- whole runs ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["fedasync", "fedbuff"])
def test_runs_never_wait_for_the_slowest_and_are_deterministic(scheme: str) -> None:
    # Prepare: the async experiment's scenario (one institution of each discipline ten times slower), shrunk
    over = SMALL + ["+experiment=async", f"scheme={scheme}"]
    cols = ["round", "institution", "metric"]
    # Execute: twice as is, once without the vectorised local step, and synchronous FedAvg for the clock
    a, again = (run(compose("config", over), backend="inprocess") for _ in range(2))
    plain = run(compose("config", over + ["engine.vectorise=false"]), backend="inprocess")
    sync = run(compose("config", over[:-1]), backend="inprocess").ledger  # fedavg
    # Assert: one arrival (with its staleness) per round, the clock never goes back and moves less than FedAvg's
    led = a.ledger
    assert (led.groupby("round").staleness.count() == 1).all()
    clock = led.groupby("round").sim_time.first()
    assert clock.is_monotonic_increasing and clock.iloc[-1] < sync.groupby("round").sim_time.first().iloc[-1]
    assert sync.staleness.isna().all()
    measured = "compute_seconds"  # wall time: the one column that may differ
    pd.testing.assert_frame_equal(a.ledger.drop(columns=measured), again.ledger.drop(columns=measured))
    values = [r.metrics.sort_values(cols)["value"].to_numpy() for r in (a, again, plain)]
    np.testing.assert_array_equal(values[0], values[1])
    # vmapped vs one-at-a-time local steps differ by float32 summation order only (tests/sim/test_batched.py)
    np.testing.assert_allclose(values[0], values[2], rtol=0, atol=1e-4)
    assert plain.ledger.staleness.equals(led.staleness) and plain.ledger.sim_time.equals(led.sim_time)


@pytest.mark.parametrize("scheme", ["fedasync", "fedbuff"])
def test_a_run_resumed_after_round_2_matches_4_rounds_straight(scheme: str, tmp_path) -> None:
    # The queue in flight (and FedBuff's buffer) come back exactly: every metric of every round identical
    ref = resume_matches_straight(["+experiment=async", f"scheme={scheme}"], tmp_path)
    assert ref.ledger.staleness.notna().sum() == 4


def test_ray_placement_gives_the_in_process_numbers(ray_cluster) -> None:
    # Prepare: FedBuff with its institutions split over two Ray host actors, and all in this process
    over = SMALL + ["+experiment=async", "scheme=fedbuff", "placement=pooled", "engine.pooled_hosts=2"]
    # Execute
    on_ray = run(compose("config", over), backend="ray")
    here = run(compose("config", over), backend="inprocess")
    # Assert: identical metrics and clock
    cols = ["round", "institution", "metric"]
    pd.testing.assert_frame_equal(on_ray.metrics.sort_values(cols).reset_index(drop=True),
                                  here.metrics.sort_values(cols).reset_index(drop=True))
    assert on_ray.ledger.sim_time.equals(here.ledger.sim_time) and math.isnan(here.ledger.staleness.iloc[-1])


def test_the_async_experiment_composes_three_schemes_at_equal_time_and_validates() -> None:
    # Prepare
    from sim.compare import scheme_configs

    cfg = compose("compare", ["+experiment=async"])
    # Execute
    configs = scheme_configs(cfg, ["+experiment=async"])
    specs = {label: load_spec(c) for label, c in configs.items()}
    # Assert: fedavg's 40 rounds (plain and with its tuned server_lr) beside 1002 arrivals of each asynchronous
    # scheme; one per discipline ten times slower
    assert {k: (s.scheme_name, s.rounds) for k, s in specs.items()} == {
        "isolated": ("isolated", 40), "fedavg": ("fedavg", 40), "fedavg_tuned": ("fedavg", 40),
        "fedasync_same_time": ("fedasync", 1002), "fedbuff_same_time": ("fedbuff", 1002)}
    assert (configs["fedavg"].scheme.server_lr, configs["fedavg_tuned"].scheme.server_lr) == (1.0, 3.0)
    # a fair comparison: the same data and local training (constant lr: no schedule tied to a scheme's round count)
    assert len({(repr(s.data), dataclasses.replace(s.training, rounds=0)) for s in specs.values()}) == 1
    assert specs["fedavg"].training.schedule == "constant"
    speeds = {(i.discipline, i.speed) for i in specs["fedavg"].scenario.institutions}
    assert speeds == {(d, v) for d in ("medicine", "physics", "finance") for v in (1.0, 0.1)}
