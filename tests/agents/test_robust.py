"""Robust merging: the pure rules against hand computations, the aggregator wrappers, and a sign-flipping cheat.

Known answers use small exactly-representable numbers; ``rtol=1e-6`` covers one float32
rounding of the float64 result.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from agents.coordinator import Coordinator
from agents.schemes.aggregate import server_step, weighted_average
from agents.schemes.fedavg import FedAvg
from agents.schemes.fedprox import FedProx
from agents.wrappers.robust import Krum, Median, MultiKrum, NormClip, TrimmedMean
from agents.schemes.robust import clip_delta, coordinate_median, krum, krum_choice, krum_scores, norm_clip, trimmed_mean
from sim.cli import compose
from sim.engine import run
from sim.core.types import ConfigError, RoundContext, Update
from refusal import refused

F32_RTOL = 1e-6
NAMES = tuple(f"inst{i}" for i in range(5))


def states(*rows: list[float]) -> list[dict[str, np.ndarray]]:
    """One float32 state ``{"w": row}`` per row."""
    return [{"w": np.array(r, np.float32)} for r in rows]


def update(index: int, state: dict, num_samples: int = 1) -> Update:
    """An update from institution ``index``."""
    return Update(institution=NAMES[index], index=index, state=state, num_samples=num_samples,
                  train_loss=0.0, compute_seconds=0.0, bytes_up=0)


# --- median and trimmed mean -------------------------------------------------------


def test_median_known_answer_odd_and_even() -> None:
    # Prepare
    odd = states([1, 10], [3, -2], [2, 7])
    even = odd + states([100, 0])
    # Execute / Assert: per coordinate; an even count averages the middle two
    np.testing.assert_array_equal(coordinate_median(odd)["w"], [2, 7])
    np.testing.assert_array_equal(coordinate_median(even)["w"], [2.5, 3.5])
    assert coordinate_median(odd)["w"].dtype == np.float32


def test_trimmed_mean_known_answer() -> None:
    # Prepare: five values per coordinate; beta 0.2 drops floor(0.2 * 5) = 1 from each end
    five = states([1, 5], [2, 4], [3, 3], [4, 2], [100, -100])
    # Execute
    out = trimmed_mean(five, 0.2)["w"]
    # Assert: (2+3+4)/3 = 3 and (2+3+4)/3 = 3 (the -100 and 5 trimmed in the second coordinate)
    np.testing.assert_allclose(out, [3.0, 3.0], rtol=F32_RTOL)
    # beta * n < 1 trims nothing: the plain mean
    np.testing.assert_allclose(trimmed_mean(five, 0.1)["w"], weighted_average(five, [1] * 5)["w"], rtol=F32_RTOL)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_refuses_a_fraction_outside_0_to_half(beta: float) -> None:
    with pytest.raises(ValueError, match="trim fraction"):
        trimmed_mean(states([1], [2]), beta)


def test_partial_states_are_merged_per_key_over_their_carriers() -> None:
    # Prepare: "b" is carried by two of three states only
    s = [{"a": np.array([1.0]), "b": np.array([10.0])}, {"a": np.array([2.0])}, {"a": np.array([9.0]), "b": np.array([20.0])}]
    # Execute / Assert
    assert coordinate_median(s) == {"a": np.array([2.0]), "b": np.array([15.0])}
    assert trimmed_mean(s, 0.4)["b"] == 15.0  # floor(0.4 * 2) = 0 trimmed over b's two carriers
    assert trimmed_mean(s, 0.4)["a"] == 2.0  # floor(0.4 * 3) = 1 trimmed each side over a's three


def test_integer_arrays_round_back() -> None:
    s = [{"n": np.array([1], np.int64)}, {"n": np.array([2], np.int64)}]
    out = coordinate_median(s)["n"]
    assert out.dtype == np.int64 and out[0] == 2  # 1.5 rounds half to even: 2


# --- Krum --------------------------------------------------------------------------


HONEST_AND_OUTLIER = states([1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.2], [-50.0, 80.0])


def test_krum_picks_from_the_honest_cluster_when_one_of_five_is_far_off() -> None:
    # Prepare: f = 1, so each score sums the n - f - 2 = 2 nearest squared distances
    # Execute
    scores = krum_scores(HONEST_AND_OUTLIER, 1)
    out = krum(HONEST_AND_OUTLIER, 1)["w"]
    # Assert: by hand, state 0's two nearest are states 1 and 2 at 0.02 each -> 0.04, the lowest score
    np.testing.assert_allclose(scores[0], 0.04, rtol=1e-5)
    assert scores.argmax() == 4
    np.testing.assert_allclose(out, [1.0, 1.0], rtol=F32_RTOL)


def test_multi_krum_averages_the_m_best_and_never_the_outlier() -> None:
    # Execute
    chosen = krum_choice(HONEST_AND_OUTLIER, 1, m=4)
    out = krum(HONEST_AND_OUTLIER, 1, m=4)["w"]
    # Assert: the four honest states, their plain mean
    assert chosen == [0, 1, 2, 3]
    np.testing.assert_allclose(out, [1.0, 1.05], rtol=F32_RTOL)


def test_multi_krum_by_default_averages_all_but_the_f_it_must_assume_lie() -> None:
    # Prepare: Multi-Krum as configured by default (krum_m null), f = 1, over five updates
    rule = MultiKrum(FedAvg(), byzantine=1)
    # Execute
    out = rule.rule({}, HONEST_AND_OUTLIER, [1.0] * 5)["w"]
    # Assert: n - f = 4 updates averaged (the four honest ones), not Krum's single pick
    np.testing.assert_allclose(out, krum(HONEST_AND_OUTLIER, 1, m=4)["w"], rtol=F32_RTOL)
    assert not np.allclose(out, krum(HONEST_AND_OUTLIER, 1)["w"])


def test_krum_ties_go_to_the_earlier_institution() -> None:
    # Prepare: five identical states: every score is 0
    same = states(*[[1.0, 2.0]] * 5)
    # Execute / Assert
    assert krum_choice(same, 1) == [0]
    assert krum_choice(same, 1, m=2) == [0, 1]


@pytest.mark.parametrize("n, f, m", [(4, 1, 1), (6, 2, 1), (5, 1, 5), (5, 1, 0)])
def test_krum_refuses_too_few_updates_or_a_bad_m(n: int, f: int, m: int) -> None:
    with pytest.raises(ValueError, match="Krum"):
        krum(states(*[[float(i)] for i in range(n)]), f, m)


# --- norm clipping -----------------------------------------------------------------


def test_clipping_bounds_the_change_and_keeps_small_ones() -> None:
    # Prepare: global at (1, 1); a change of (3, 4) has norm 5
    glob = {"w": np.array([1.0, 1.0]), "frozen": np.array([7.0])}
    # Execute
    big = clip_delta(glob, {"w": np.array([4.0, 5.0])}, 1.0)
    small = clip_delta(glob, {"w": np.array([1.3, 1.4])}, 1.0)
    # Assert: scaled to norm 1 along the same direction; a change of norm 0.5 untouched; only sent keys returned
    np.testing.assert_allclose(big["w"], [1.6, 1.8], rtol=1e-12)
    np.testing.assert_allclose(small["w"], [1.3, 1.4], rtol=1e-12)
    assert set(big) == {"w"}


def test_norm_clip_bounds_an_outliers_pull_on_the_mean() -> None:
    # Prepare
    glob = {"w": np.zeros(2, np.float32)}
    # Execute
    out = norm_clip(glob, HONEST_AND_OUTLIER, [1.0] * 5, 0.5)["w"]
    # Assert: every change clipped to norm 0.5, so the mean moved at most 0.5 from the global model
    assert np.linalg.norm(out) <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="> 0"):
        clip_delta(glob, glob, 0.0)


def test_rules_are_deterministic_bit_for_bit() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    s = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4)} for _ in range(7)]
    glob = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4)}
    rules = [coordinate_median, lambda x: trimmed_mean(x, 0.2), lambda x: krum(x, 2, 3), lambda x: norm_clip(glob, x, [1] * 7, 1.0)]
    # Execute / Assert: a second call on copies gives the very same bits
    for rule in rules:
        first, again = rule(s), rule([{k: v.copy() for k, v in x.items()} for x in s])
        assert all(first[k].tobytes() == again[k].tobytes() for k in first)


# --- the aggregator wrapper --------------------------------------------------------

RULES = {"median": lambda s: Median(s), "trimmed_mean": lambda s: TrimmedMean(s), "krum": lambda s: Krum(s),
         "multi_krum": lambda s: MultiKrum(s, krum_m=3), "norm_clip": lambda s: NormClip(s, clip_norm=0.5)}


def test_default_merge_is_todays_fedavg_exactly() -> None:
    # Prepare
    glob = {"w": np.zeros(2, np.float32)}
    ups = [update(0, {"w": np.array([1.0, 2.0], np.float32)}, 1), update(1, {"w": np.array([3.0, 4.0], np.float32)}, 3)]
    ctx = RoundContext(round=1, seed=0, cohort=NAMES, server_scale=0.5)
    # Execute
    out = FedAvg(server_lr=0.8).merge(ctx, glob, ups)
    # Assert: bit-identical to the pre-option computation
    expected = server_step(glob, weighted_average([u.state for u in ups], [1.0, 3.0]), 0.8 * 0.5)
    assert out["w"].tobytes() == expected["w"].tobytes()


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_robust_merge_ignores_a_far_outlier(rule: str) -> None:
    # Prepare
    glob = {"w": np.array([1.0, 1.0], np.float32)}
    ups = [update(i, s, 10) for i, s in enumerate(HONEST_AND_OUTLIER)]
    ctx = RoundContext(round=1, seed=0, cohort=NAMES)
    # Execute: the rule wrapped around FedProx (any scheme of FedAvg's family)
    out = RULES[rule](FedProx()).merge(ctx, glob, ups)["w"]
    # Assert: within 0.5 of the honest cluster around (1, 1); the plain mean lands near (-8.4, 17)
    assert np.linalg.norm(out - 1.0) <= 0.5
    assert np.linalg.norm(FedAvg().merge(ctx, glob, ups)["w"] - 1.0) > 10


def test_a_rule_keeps_the_wrapped_schemes_server_step() -> None:
    # Prepare: the median of three states, applied by FedAvg's step with server_lr 0.5 and the round's factor 0.5
    glob = {"w": np.zeros(1, np.float32)}
    ups = [update(i, {"w": np.array([v], np.float32)}) for i, v in enumerate([1.0, 2.0, 9.0])]
    ctx = RoundContext(round=1, seed=0, cohort=NAMES[:3], server_scale=0.5)
    # Execute
    out = Median(FedAvg(server_lr=0.5)).merge(ctx, glob, ups)
    # Assert: old + 0.25 * (median - old)
    assert out["w"].tobytes() == server_step(glob, {"w": np.array([2.0], np.float32)}, 0.25)["w"].tobytes()


@pytest.mark.parametrize("make, key", [
    (lambda: TrimmedMean(FedAvg(), trim=0.5), "aggregator.trim"),
    (lambda: TrimmedMean(FedAvg(), trim=-0.1), "aggregator.trim"),
    (lambda: NormClip(FedProx(), clip_norm=0.0), "aggregator.clip_norm"),
    (lambda: MultiKrum(FedAvg(), krum_m=0), "aggregator.krum_m"),
    (lambda: Krum(FedAvg(), byzantine=-1), "aggregator.byzantine"),
])
def test_bad_merge_settings_name_their_key(make, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == key


def test_krum_with_f_too_large_for_the_cohort_is_refused_when_selecting() -> None:
    # Prepare: 5 institutions, f = 2 needs more than 6
    scheme = Krum(FedAvg(), byzantine=2)
    # Execute / Assert: the first select (round 1, before anything trains) refuses, naming the key
    with pytest.raises(ConfigError) as err:
        scheme.select(RoundContext(round=1, seed=0, cohort=NAMES))
    assert err.value.key == "aggregator.byzantine" and "selects 5 of 5" in str(err.value)
    with pytest.raises(ConfigError, match="aggregator.krum_m"):
        MultiKrum(FedAvg(), krum_m=5).check(NAMES)
    Krum(FedAvg(), byzantine=1).check(NAMES)  # 5 > 2*1 + 2


@pytest.mark.parametrize("make", [lambda: Krum(FedAvg()), lambda: MultiKrum(FedAvg(), krum_m=2)])
def test_a_round_that_dropouts_left_too_short_for_krum_keeps_the_previous_model(make, caplog) -> None:
    # Prepare: five were selected, four arrived; Krum with f=1 needs five
    ctx = RoundContext(round=3, seed=0, cohort=NAMES)
    ups = [update(i, s) for i, s in enumerate(HONEST_AND_OUTLIER[:4])]
    # Execute
    with caplog.at_level("WARNING", logger="collabsim"):
        out = make().merge(ctx, {"w": np.zeros(2, np.float32)}, ups)
    # Assert: no merge (None keeps the previous state), and the log says why
    assert out is None
    assert "round 3: " in caplog.text and "needs 5 updates and 4 arrived (dropouts); the global model is kept" in caplog.text


def test_krum_with_dropouts_runs_to_the_end_warning_before_it_starts(small_cfg, caplog) -> None:
    # Prepare: six institutions each present half the time; Krum with f=1 needs five updates a round
    cfg = small_cfg("aggregator=krum", "scenario.availability=0.5", "rounds=3")
    # Execute
    with caplog.at_level("WARNING", logger="collabsim"):
        result = run(cfg, backend="inprocess")
    # Assert: every round is in the ledger, and the warnings say which rounds kept the model
    assert sorted(result.ledger["round"].unique()) == [1, 2, 3]
    assert "6 institutions may drop out" in caplog.text and "the global model is kept this round" in caplog.text


@pytest.mark.parametrize("overrides, named", [
    (["aggregator=mode"], "aggregator"),
    (["aggregator=trimmed_mean", "aggregator.trim=0.5"], "aggregator.trim: must lie in [0, 0.5)"),
    (["aggregator=trimmed_mean", "aggregator.trim=0.1"], "aggregator.trim: 0.1 of a cohort of 6 trims floor(0.1 * 6) = 0 "
                                                         "institutions from each end, so the merge is the plain mean"),
    (["aggregator=norm_clip", "aggregator.clip_norm=0"], "aggregator.clip_norm"),
    (["aggregator=krum", "aggregator.byzantine=-1"], "aggregator.byzantine"),
    (["aggregator=median", "aggregator.trim=0.1"], "aggregator.trim"),  # a key the chosen rule does not take
    (["scheme=qffl", "aggregator=median"], "aggregator=median cannot wrap scheme qffl"),
])
def test_bad_merge_settings_give_one_line_before_anything_runs(overrides: list[str], named: str, capsys) -> None:
    err = refused(["scheme=fedprox", *overrides], capsys)
    assert named in err


# --- a sign-flipping institution, end to end ----------------------------------------

ATTACKER, FLIP = 4, 4.0  # the last of five institutions sends global - 4 * (its change): it cancels the honest four
IID_DIGITS = ["data=digits", "scenario.num_institutions=5", "scenario.label_skew=null", "scenario.quantity_skew=0",
              "rounds=20", "training.local_epochs=2", "checkpoint_every=0", "results.select=last"]
REAL_MERGE = Coordinator.merge  # each call below patches over the original, never over an earlier patch


def final_accuracy(monkeypatch, attack: str, *overrides: str) -> float:
    """Global test accuracy after the last round, with institution ATTACKER flipping ('flip') or left out ('drop')."""
    real = REAL_MERGE

    def cheat(self, ctx, lost, *lists):
        def bent(u):
            if u.index != ATTACKER:
                return u
            if attack == "drop":
                return replace(u, state={})  # an empty state is not merged: the honest four alone
            return replace(u, state={k: (self.state[k] - FLIP * (v - self.state[k])).astype(v.dtype) for k, v in u.state.items()})
        return real(self, ctx, lost, *[[bent(u) for u in lst] for lst in lists])

    monkeypatch.setattr(Coordinator, "merge", cheat)
    m = run(compose("config", IID_DIGITS + list(overrides)), backend="inprocess").metrics
    acc = m[(m.institution == "global") & (m.metric == "accuracy")]
    return float(acc.loc[acc["round"] == acc["round"].max(), "value"].item())


def test_robust_merges_survive_one_sign_flipper_of_five_where_the_mean_breaks(monkeypatch) -> None:
    # Prepare: the honest-only reference (the cheat's update never merged)
    honest = final_accuracy(monkeypatch, "drop")
    # Execute
    got = {merge: final_accuracy(monkeypatch, "flip", f"aggregator={merge}",
                                 *(["aggregator.krum_m=3"] if merge == "multi_krum" else []))
           for merge in ("mean", "median", "trimmed_mean", "krum", "multi_krum")}
    # Assert: the numbers: >= 95% of honest-only for the robust rules; the mean visibly broken (< 50%)
    assert honest > 0.7, honest
    for merge in ("median", "trimmed_mean", "krum", "multi_krum"):
        assert got[merge] >= 0.95 * honest, (merge, got[merge], honest)
    assert got["mean"] < 0.5 * honest, (got["mean"], honest)
    assert not math.isnan(got["mean"])
