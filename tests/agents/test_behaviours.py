"""Behaviours of institutions: the pure functions, the scenario keys, the data they change, and end-to-end effects.

Known answers use small exactly-representable numbers. End-to-end runs are in-process on
digits (IID, 5 institutions); their thresholds are the issue's numbers.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from agents import behaviours as B
from sim.core.data import corruption as C
from analysis.contribution import exact_shapley
from sim.cli import compose
from sim.checks import load_spec
from sim.contribution import _value
from sim.core.data import build_federation
from sim.engine import run
from sim.core.scenario import BehavingSpec, build_scenario
from sim.core.types import ConfigError, InstitutionSpec
from refusal import refused

IID_DIGITS = ["data=digits", "scenario.num_institutions=5", "scenario.label_skew=null", "scenario.quantity_skew=0",
              "training.local_epochs=2", "checkpoint_every=0", "results.select=last"]


def final_accuracy(result) -> float:
    """Global test accuracy after the last round."""
    m = result.metrics
    acc = m[(m.institution == "global") & (m.metric == "accuracy")]
    return float(acc.loc[acc["round"] == acc["round"].max(), "value"].item())


# --- on the update -------------------------------------------------------------------


def test_free_ride_sends_the_received_model_or_that_plus_noise() -> None:
    # Prepare
    got = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([3], np.int64)}
    # Execute
    plain = B.free_ride(got, 0.0, None)
    noisy = B.free_ride({"w": np.zeros(20_000, np.float32)}, 0.5, np.random.default_rng(0))["w"]
    # Assert: an equal copy; noise of the asked std (20k draws: std within 2%), counters untouched
    assert plain["w"].tobytes() == got["w"].tobytes() and plain["w"] is not got["w"]
    assert noisy.dtype == np.float32 and abs(noisy.std() - 0.5) < 0.01
    assert B.free_ride(got, 1.0, np.random.default_rng(0))["n"][0] == 3


def test_sign_flip_and_scaled_send_global_minus_or_plus_scale_times_the_change() -> None:
    # Prepare: started at (1, 1), trained to (2, 0.5): the change is (1, -0.5)
    start, trained = {"w": np.array([1.0, 1.0], np.float32)}, {"w": np.array([2.0, 0.5], np.float32)}
    flip = BehavingSpec(index=0, name="a", discipline="d", share=1.0, behaviour="sign_flip")
    boost = BehavingSpec(index=0, name="a", discipline="d", share=1.0, behaviour="scaled")
    flip4 = BehavingSpec(index=0, name="a", discipline="d", share=1.0, behaviour="sign_flip", scale=4.0)
    # Execute / Assert
    np.testing.assert_array_equal(B.bend(flip, trained, start)["w"], [0.0, 1.5])
    np.testing.assert_array_equal(B.bend(boost, trained, start)["w"], [11.0, -4.0])
    np.testing.assert_array_equal(B.bend(flip4, trained, start)["w"], [-3.0, 3.0])
    np.testing.assert_array_equal(B.bend(flip, {"g": np.array([0.5])}, {})["g"], [-0.5])  # a gradient: negated
    assert B.bend(flip, trained, start)["w"].dtype == np.float32


def test_an_honest_update_is_passed_through_untouched() -> None:
    payload = {"w": np.array([1.0])}
    honest = InstitutionSpec(index=0, name="a", discipline="d", share=1.0)
    assert B.bend(honest, payload, {"w": np.array([0.0])}) is payload
    for b in ("free_rider", "noisy_labels", "data_poisoning"):  # not update-bending behaviours
        assert B.bend(BehavingSpec(index=0, name="a", discipline="d", share=1.0, behaviour=b), payload, {}) is payload


# --- on the data ---------------------------------------------------------------------


def test_flip_labels_moves_the_asked_fraction_to_another_class_deterministically() -> None:
    # Prepare
    y = np.arange(100) % 10
    # Execute
    out = C.flip_labels(y, 0.3, 10, np.random.default_rng(7))
    again = C.flip_labels(y, 0.3, 10, np.random.default_rng(7))
    # Assert: exactly 30 labels moved, each to a valid other class; same stream, same labels; input untouched
    assert (out != y).sum() == 30 and out.min() >= 0 and out.max() <= 9
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(y, np.arange(100) % 10)


def test_poison_triggers_the_fraction_and_relabels_it() -> None:
    # Prepare
    x, y = np.zeros((10, 1, 2, 3), np.float32), np.arange(10) % 3 + 1
    # Execute
    px, py = C.poison(x, y, 0.5, 2, 9.0, 0, np.random.default_rng(0))
    # Assert: five rows carry the trigger in their first two elements and label 0; the rest as they were
    hit = (py == 0)
    assert hit.sum() == 5
    assert (px[hit].reshape(5, -1)[:, :2] == 9.0).all() and (px[hit].reshape(5, -1)[:, 2:] == 0).all()
    assert (px[~hit] == 0).all() and (x == 0).all()


def test_backdoor_success_counts_only_rows_not_already_of_the_target() -> None:
    # Of the three non-target rows, two are predicted as the target
    assert C.backdoor_success(np.array([0, 0, 1, 0]), np.array([0, 1, 1, 2]), 0) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(C.add_trigger(np.zeros((1, 4)), 2, 1.0), [[1.0, 1.0, 0.0, 0.0]])


def test_data_behaviours_change_only_the_training_split() -> None:
    # Prepare: the same scenario, honest and with two misbehaving rows
    rows = [{"name": n, "share": 0.25} for n in "abcd"]
    bad = [dict(rows[0], behaviour="noisy_labels", label_noise=0.5),
           dict(rows[1], behaviour="data_poisoning", poison_fraction=0.2, target_label=3), *rows[2:]]
    data = {"name": "digits"}
    # Execute
    honest = build_federation(data, build_scenario({"institutions": rows}, 0), 0)
    noisy = build_federation(data, build_scenario({"institutions": bad}, 0), 0)
    # Assert: half of a's labels flipped, a fifth of b's rows triggered and relabelled 3; test/val and c, d untouched
    a0, a1, b0, b1 = honest.shards[0], noisy.shards[0], honest.shards[1], noisy.shards[1]
    assert (a0.y_train != a1.y_train).sum() == C.half_up(0.5, a0.num_train)
    triggered = (b1.x_train.reshape(b1.num_train, -1)[:, :4] == 1.0).all(axis=1) & (b1.y_train == 3)
    assert triggered.sum() >= C.half_up(0.2, b0.num_train)
    for h, n in zip(honest.shards, noisy.shards):
        assert h.x_test.tobytes() == n.x_test.tobytes() and h.y_val.tobytes() == n.y_val.tobytes()
    assert honest.shards[2].x_train.tobytes() == noisy.shards[2].x_train.tobytes()


def test_a_target_label_the_data_lacks_is_refused_naming_the_row() -> None:
    rows = [{"name": "a", "share": 0.5, "behaviour": "data_poisoning", "target_label": 10}, {"name": "b", "share": 0.5}]
    with pytest.raises(ConfigError) as err:
        build_federation({"name": "digits"}, build_scenario({"institutions": rows}, 0), 0)
    assert err.value.key == "scenario.institutions[0].target_label"


# --- the scenario keys ---------------------------------------------------------------


def test_shares_of_a_generated_population_are_drawn_from_the_seed() -> None:
    # Prepare
    cfg = {"num_institutions": 20, "behaviours": {"free_rider": 0.1, "sign_flip": 0.2}, "scale": 4}
    # Execute
    first, again, other = build_scenario(cfg, 0), build_scenario(cfg, 0), build_scenario(cfg, 1)
    # Assert: 2 free-riders and 4 sign-flippers carrying the scenario's scale; the same ones for a seed, others for another
    kinds = [s.behaviour for s in first.institutions]
    assert kinds.count("free_rider") == 2 and kinds.count("sign_flip") == 4 and kinds.count("honest") == 14
    assert all(s.scale == 4.0 for s in first.institutions if s.behaviour == "sign_flip")
    assert first == again and [s.behaviour for s in other.institutions] != kinds
    assert all(type(s) is InstitutionSpec for s in first.institutions if s.behaviour == "honest")


@pytest.mark.parametrize("override, named", [
    ("+scenario.institutions.0.behaviour=sneaky", "scenario.institutions[0].behaviour: unknown behaviour 'sneaky'"),
    ("+scenario.institutions.0.label_noise=0.5", "scenario.institutions[0].label_noise: is a setting of behaviour "
                                                 "noisy_labels"),
    ("scenario.label_noise=1.5", "scenario.label_noise: must be in [0, 1]"),
    ("scenario.scale=0", "scenario.scale: must be > 0"),
    ("scenario.behaviours={sign_flip: 0.2}", "scenario.behaviours: shares of behaviours apply to a generated population"),
])
def test_bad_behaviour_settings_give_one_line_before_anything_runs(override: str, named: str, capsys) -> None:
    err = refused([override], capsys)
    assert named in err, err


@pytest.mark.parametrize("shares, named", [
    ("{free_rider: 0.6, sign_flip: 0.6}", "scenario.behaviours: asks for 6 misbehaving institutions but the population has 5"),
    ("{free_rider: 1.5}", "scenario.behaviours.free_rider: must be in [0, 1]"),
    ("{cheat: 0.1}", "scenario.behaviours.cheat: unknown behaviour 'cheat'"),
])
def test_bad_shares_give_one_line(shares: str, named: str, capsys) -> None:
    err = refused(["scenario.num_institutions=5", f"scenario.behaviours={shares}"], capsys)
    assert named in err, err


# --- in-process runs -----------------------------------------------------------------

SMOKE = ["data=digits", "scenario.num_institutions=6", "rounds=3", "smoke=true", "checkpoint_every=0"]
MIXED = SMOKE + ["scenario.behaviours={free_rider: 0.15, noisy_labels: 0.15, sign_flip: 0.15, scaled: 0.15, "
                 "data_poisoning: 0.15}", "scenario.scale=2"]


def test_an_all_honest_scenario_gives_todays_numbers_bit_for_bit() -> None:
    # Shares of zero and no shares are the same all-honest population (metrics checked against the
    # pre-behaviour code when this was written: same hashes on the vectorised and the plain path).
    plain = run(compose("config", SMOKE), backend="inprocess")
    zero = run(compose("config", SMOKE + ["scenario.behaviours={free_rider: 0.0}"]), backend="inprocess")
    assert plain.metrics.value.to_numpy().tobytes() == zero.metrics.value.to_numpy().tobytes()
    assert set(plain.institutions.behaviour) == {"honest"}


def test_behaviours_are_deterministic_and_the_same_with_or_without_vectorising() -> None:
    # Execute
    a = run(compose("config", MIXED), backend="inprocess")
    again = run(compose("config", MIXED), backend="inprocess")
    plain = run(compose("config", MIXED + ["engine.vectorise=false"]), backend="inprocess")
    # Assert: bit-identical reruns; the vectorised step matches the plain one to float32 rounding
    # of its sums (1e-5 on losses), accuracies identical; every behaviour visible in institutions
    assert a.metrics.value.to_numpy().tobytes() == again.metrics.value.to_numpy().tobytes()
    np.testing.assert_allclose(a.metrics.value, plain.metrics.value, rtol=1e-5, atol=1e-6)
    assert sorted(a.institutions.behaviour) == sorted(["honest", "free_rider", "noisy_labels", "sign_flip", "scaled",
                                                      "data_poisoning"])
    # A free-rider spends no compute: nothing measured, only transfer time on the clock, its samples still claimed
    ledger = a.ledger.merge(a.institutions[["institution", "behaviour"]], on="institution")
    rider, honest = ledger[ledger.behaviour == "free_rider"], ledger[ledger.behaviour == "honest"]
    assert (rider.compute_seconds == 0).all() and (rider.samples > 0).all()
    assert (rider.simulated_seconds.to_numpy() < honest.simulated_seconds.to_numpy()).all()


def test_one_sign_flipper_of_five_breaks_the_mean_and_not_the_median() -> None:
    # Prepare: one of five sends global - 4 * (its change), cancelling the honest four under the mean
    cfg = IID_DIGITS + ["rounds=20", "scenario.behaviours={sign_flip: 0.2}", "scenario.scale=4"]
    spec = load_spec(compose("config", cfg))
    honest = tuple(s.name for s in spec.scenario.institutions if s.behaviour == "honest")
    assert len(honest) == 4
    # Execute
    alone = final_accuracy(run(spec, backend="inprocess", institutions=honest))
    mean = final_accuracy(run(spec, backend="inprocess"))
    median = final_accuracy(run(compose("config", cfg + ["aggregator=median"]), backend="inprocess"))
    # Assert: the numbers (measured 0.844 honest-only, 0.231 mean, 0.836 median)
    assert alone > 0.7, alone
    assert mean < 0.5 * alone, (mean, alone)
    assert median >= 0.95 * alone, (median, alone)


def test_a_free_riders_shapley_value_is_about_zero() -> None:
    # Prepare: three IID institutions, one free-riding; every coalition run in-process (exact Shapley)
    spec = load_spec(compose("config", [*IID_DIGITS, "scenario.num_institutions=3", "rounds=30",
                                        "scenario.behaviours={free_rider: 0.34}"]))
    players = list(spec.scenario.names)
    rider = next(s.name for s in spec.scenario.institutions if s.behaviour == "free_rider")
    values = {}
    for k in range(1, len(players) + 1):
        for c in combinations(players, k):
            values[frozenset(c)], values[frozenset()] = _value(spec, c)
    # Execute
    phi = exact_shapley(values, players)
    # Assert: alone it is the untrained model; its value is near zero (measured -0.020: its claimed samples
    # dilute the honest mean a little) against the honest ones' ~0.4
    assert values[frozenset([rider])] == values[frozenset()]
    honest = [phi[p] for p in players if p != rider]
    assert min(honest) > 0.3, phi
    assert -0.05 < phi[rider] < 0.01, phi


def test_a_backdoor_is_scored_on_the_triggered_global_test_set_and_reported_in_the_damage_table() -> None:
    from analysis.trust import damage_table

    # Prepare: two of five institutions poison half their rows; the reference has everybody honest
    cfg = IID_DIGITS + ["rounds=3", "scenario.poison_fraction=0.5"]
    # Execute
    poisoned = run(compose("config", cfg + ["scenario.behaviours={data_poisoning: 0.4}"]), backend="inprocess")
    honest = run(compose("config", cfg), backend="inprocess")
    # Assert: the global model learns the trigger (from chance at round 0); runs without a poisoner score nothing
    m = poisoned.metrics[poisoned.metrics.metric == "backdoor_success"]
    assert set(m.institution) == {"global"} and list(m["round"]) == [0, 1, 2, 3]
    assert m.value.iloc[0] < 0.3 and m.value.iloc[-1] > 0.8
    assert "backdoor_success" not in set(honest.metrics.metric)
    honest.metrics["scheme"] = honest.institutions["scheme"] = "fedavg_honest"
    both = (pd.concat([poisoned.metrics, honest.metrics]), pd.concat([poisoned.institutions, honest.institutions]))
    row = damage_table(*both).set_index("scheme").loc["fedavg"]
    assert row["backdoor_success"] == pytest.approx(m[m.selected].value.iloc[0])
