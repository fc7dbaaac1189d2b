"""Compression of uploads: the pure top-k / int8 / error-feedback functions, the wrapper, and an end-to-end run.

Tolerances: a change is sent in the array's dtype (float32), so a value that went through a
float64 sum and back may be off by one float32 rounding (``F32_RTOL``); quantisation error is
bounded by the scale, up to that rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from agents.institution import Institution
from agents.schemes.compression import compress, decompress, kept, restore, topk, with_feedback
from agents.schemes.dp_fedavg import DPFedAvg
from agents.schemes.fedavg import FedAvg
from agents.schemes.fedprox import FedProx
from agents.schemes.isolated import Isolated
from agents.schemes.scaffold import Scaffold
from agents.wrappers.compression import Compress, Compression, restored
from agents.wrappers.secagg import SecureAggregation
from sim.cli import compose
from sim.engine import run
from sim.core.models import build_model, get_state
from sim.core.types import ConfigError, InstitutionSpec, LocalPlan, RoundContext, Shard, TrainingSpec, Update
from refusal import refused

F32_RTOL = 1e-6


def change(seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 change of two arrays and an integer buffer, from a fixed seed."""
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((8, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
            "steps": np.array([3], np.int64)}


# --- the pure functions ------------------------------------------------------------


@pytest.mark.parametrize("method, ratio", [("none", 1.0), ("topk", 1.0)])
def test_round_trip_is_exact_without_loss(method: str, ratio: float) -> None:
    # Prepare
    c = change()
    # Execute
    dense, rest = decompress(compress(c, method, ratio), c)
    # Assert: bit for bit, the integer buffer passed whole
    got = {**rest, **dense}
    assert set(got) == set(c)
    for k in c:
        np.testing.assert_array_equal(got[k], c[k])
        assert got[k].dtype == c[k].dtype


def test_topk_keeps_the_largest_magnitudes_and_breaks_ties_by_index() -> None:
    # Prepare: |-3| = |3| = |3| tie for the top; 0.5 and 1 are smaller
    x = np.array([1.0, -3.0, 0.5, 3.0, -3.0], np.float32)
    # Execute / Assert
    np.testing.assert_array_equal(topk(x, 2), [1, 3])  # of the three tied, the two lowest indices
    np.testing.assert_array_equal(topk(x, 4), [0, 1, 3, 4])
    sent = compress({"x": x}, "topk", 0.4)  # ceil(0.4 * 5) = 2 entries
    np.testing.assert_array_equal(sent["x/idx"], [1, 3])
    np.testing.assert_array_equal(sent["x/values"], [-3.0, 3.0])
    assert sent["x/idx"].dtype == np.int32 and sent["x/values"].dtype == np.float32
    # every kept magnitude is at least every dropped one, on a random array
    r = np.random.default_rng(1).standard_normal(1000)
    idx = topk(r, 100)
    dropped = np.setdiff1d(np.arange(1000), idx)
    assert idx.size == 100 and np.abs(r[idx]).min() >= np.abs(r[dropped]).max()


def test_kept_counts_are_the_ceiling_of_ratio_times_size() -> None:
    assert kept(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert kept(4096, 0.1) == 410 and kept(10, 0.1) == 1 and kept(5, 1e-6) == 1 and kept(0, 0.5) == 0
    assert kept(7, 1.0) == 7


def test_int8_error_is_at_most_half_a_scale_step() -> None:
    # Prepare
    c = change(2)
    # Execute
    sent = compress(c, "int8")
    dense, _ = decompress(sent, c)
    # Assert: codes are int8 in [-127, 127], scales float32 max|x| / 127, error <= scale / 2 (+ a float32 rounding)
    for k in ("w", "b"):
        scale = float(sent[f"{k}/scale"])
        assert sent[f"{k}/codes"].dtype == np.int8 and np.abs(sent[f"{k}/codes"]).max() == 127
        assert scale == pytest.approx(np.abs(c[k]).max() / 127, rel=F32_RTOL)
        err = np.abs(dense[k].astype(np.float64) - c[k])
        assert err.max() <= scale / 2 + F32_RTOL * np.abs(c[k]).max()
    # an all-zero change has scale 0 and comes back as zeros
    zero, _ = decompress(compress({"z": np.zeros(3, np.float32)}, "int8"), {"z": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(zero["z"], 0.0)


def test_wire_bytes_are_values_plus_int32_indices_or_one_byte_plus_a_scale() -> None:
    c = change()
    sizes = {k: v.nbytes for k, v in compress(c, "topk", 0.1).items()}
    assert sum(sizes.values()) == (kept(40, 0.1) + kept(7, 0.1)) * (4 + 4) + 8  # + the int64 buffer, whole
    assert sum(v.nbytes for v in compress(c, "int8").values()) == (40 + 4) + (7 + 4) + 8


def test_restore_adds_the_global_model_back() -> None:
    # Prepare
    g = change(3)
    w = {k: (v + np.float32(0.25)).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in g.items()}
    delta = {k: w[k] - g[k] for k in ("w", "b")}
    # Execute
    back = restore(g, {**compress(delta, "topk", 1.0), "steps": w["steps"]})
    # Assert: the weights, up to one float32 rounding of g + (w - g); an uncompressed payload is untouched
    for k in w:
        np.testing.assert_allclose(back[k], w[k], rtol=F32_RTOL)
    assert restore(g, w) == w


def test_error_feedback_makes_the_sent_sum_track_the_true_sum() -> None:
    # Prepare: 200 rounds of changes with a steady direction plus noise (float64, so sums are exact enough)
    rng = np.random.default_rng(4)
    drift = rng.standard_normal(50)
    changes = [{"w": drift + 2.0 * rng.standard_normal(50)} for _ in range(200)]
    residual, true_sum, sent_sum, plain_sum = {}, np.zeros(50), np.zeros(50), np.zeros(50)
    norms = []
    # Execute
    for c in changes:
        sent, residual = with_feedback(c, residual, "topk", 0.1)
        true_sum += c["w"]
        sent_sum += decompress(sent, c)[0]["w"]
        plain_sum += decompress(compress(c, "topk", 0.1), c)[0]["w"]
        norms.append(np.linalg.norm(residual["w"]))
    # Assert: what is still owed is exactly the residual; it stays bounded by the contraction bound
    # sqrt(1 - d) / (1 - sqrt(1 - d)) * max||g|| (d = 0.1: ~18.5x), while without feedback the gap grows with rounds
    np.testing.assert_allclose(true_sum - sent_sum, residual["w"], atol=1e-9)
    d, biggest = 0.1, max(np.linalg.norm(c["w"]) for c in changes)
    assert max(norms) <= math.sqrt(1 - d) / (1 - math.sqrt(1 - d)) * biggest
    assert max(norms[100:]) <= 1.5 * max(norms[:100])  # no growth in the second half
    assert np.linalg.norm(true_sum - sent_sum) < 0.2 * np.linalg.norm(true_sum - plain_sum)


def test_compression_is_deterministic_bit_for_bit() -> None:
    a = with_feedback(change(5), change(6), "topk", 0.3)
    b = with_feedback(change(5), change(6), "topk", 0.3)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


# --- the wrapper and the institution's residual ---------------------------------------


@pytest.mark.parametrize("make, key", [
    (lambda: Compression(FedAvg(), method="zip"), "compression.method"),
    (lambda: Compression(FedAvg(), ratio=0.0), "compression.ratio"),
    (lambda: Compression(FedAvg(), ratio=1.5), "compression.ratio"),
    (lambda: Compression(FedProx(), ratio=-0.1), "compression.ratio"),
    (lambda: Compression(SecureAggregation(FedAvg())), "compression"),
    (lambda: Compression(DPFedAvg(noise_multiplier=1.0).around(SecureAggregation(FedAvg())), method="int8"),
     "compression"),
    (lambda: Compression(Isolated()), "compression"),
])
def test_bad_compression_settings_name_their_key(make, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == key


@pytest.mark.parametrize("overrides, named", [
    (["compression=zip"], "compression"),
    (["compression=topk", "compression.ratio=0"], "compression.ratio: must lie in (0.0, 1.0]"),
    (["compression=topk", "compression.ratio=1.01"], "compression.ratio"),
    (["compression=topk", "secagg=masked"], "compression=topk cannot wrap scheme fedavg with secagg=masked"),
    (["scheme=fedsgd", "compression=int8"], "compression=int8 cannot wrap scheme fedsgd"),
])
def test_bad_compression_gives_one_line_before_anything_runs(overrides: list[str], named: str, capsys) -> None:
    err = refused(["scheme=fedavg", *overrides], capsys)
    assert named in err


def test_plans_carry_compression_alongside_their_own_fields() -> None:
    assert FedAvg().plan(1) == LocalPlan()  # off by default: today's plan exactly
    prox = Compression(FedProx(mu=0.1), ratio=0.2).plan(1)
    assert prox.client.pull() == 0.1 and prox.send == (Compress("topk", 0.2, True),)
    scaffold = Compression(Scaffold(), method="int8", error_feedback=False).plan(1)
    assert scaffold.client.c == {} and scaffold.send == (Compress("int8", 0.1, False),)
    # DP-FedAvg combines: the coordinator clips and noises the decompressed change (central DP)
    assert Compression(DPFedAvg(noise_multiplier=1.0)).plan(1).send == (Compress("topk", 0.1, True),)


def test_the_wrapper_turns_uploads_back_into_weights_before_the_merge() -> None:
    g = {"w": np.zeros(4, np.float32)}
    sent = compress({"w": np.array([0.0, 2.0, -1.0, 0.5], np.float32)}, "topk", 0.5)
    u = Update(institution="a", index=0, state=sent, num_samples=1, train_loss=0.0, compute_seconds=0.0, bytes_up=0)
    (back,) = restored(g, [u])
    np.testing.assert_array_equal(back.state["w"], [0.0, 2.0, -1.0, 0.0])
    ctx = RoundContext(round=1, seed=0, cohort=("a",))
    merged = Compression(FedAvg(), ratio=0.5).merge(ctx, g, [u])  # the wrapper's merge reads the restored weights
    np.testing.assert_array_equal(merged["w"], [0.0, 2.0, -1.0, 0.0])


def institution() -> Institution:
    """An institution with a one-row shard (its data is never used here)."""
    spec = InstitutionSpec(index=0, name="a", discipline="x", share=1.0)
    one = np.zeros((1, 2), np.float32)
    shard = Shard(name="a", x_train=one, y_train=np.zeros(1, np.int64), x_test=one, y_test=np.zeros(1, np.int64))
    return Institution(spec, shard, training=TrainingSpec(), seed=0, initial={})


def send(step: Compress, who: Institution, g: dict, state: dict) -> dict:
    """What ``who``'s host sends of an upload of ``state`` under the compression step ``step``."""
    u = Update(institution="a", index=0, state=state, num_samples=1, train_loss=0.0, compute_seconds=0.0, bytes_up=0)
    return step(who, RoundContext(round=1, seed=0, cohort=("a",)), g, u).state


def test_the_residual_is_persistent_state_a_restarted_institution_gets_back() -> None:
    # Prepare: one upload under error feedback, then a fresh institution given what the first carries
    step = Compress("topk", 0.2)
    g = {k: np.zeros_like(v) for k, v in change().items()}
    first = institution()
    send(step, first, g, change(7))
    carried = first.persistent()
    again = institution()
    again.restore(carried)
    # Execute: both send the next round's change
    a, b = send(step, first, g, change(8)), send(step, again, g, change(8))
    # Assert: the residual crossed (named residual/<key>), and the two uploads agree bit for bit
    assert {"residual/w", "residual/b"} <= set(carried) and "residual/steps" not in carried
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    plain = institution()
    send(Compress("topk", 1.0, error_feedback=False), plain, g, change(7))
    assert not plain.persistent()  # nothing carried without error feedback


# --- end to end ---------------------------------------------------------------------

IID_DIGITS = ["data=digits", "scenario.num_institutions=5", "scenario.label_skew=null", "scenario.quantity_skew=0",
              "rounds=20", "training.local_epochs=2", "checkpoint_every=0", "results.select=last"]
SMOKE = ["smoke=true", "rounds=3", "data.num_samples=600", "checkpoint_every=0", "results.select=last"]


def final(overrides: list[str]) -> tuple[float, int, int]:
    """(final global accuracy, total bytes up, updates sent) of an in-process run."""
    r = run(compose("config", overrides), backend="inprocess")
    m, ledger = r.metrics, r.ledger
    acc = m[(m.institution == "global") & (m.metric == "accuracy")]
    sent = ledger[(ledger.institution != "global") & ledger.participated]
    return float(acc.loc[acc["round"] == acc["round"].max(), "value"].item()), int(sent.bytes_up.sum()), len(sent)


def test_topk_with_error_feedback_keeps_fedavgs_accuracy_at_a_fifth_of_the_bytes() -> None:
    # Prepare: the model the run trains, to count the bytes by hand
    cfg = compose("config", IID_DIGITS)
    state = get_state(build_model(OmegaConf.to_container(cfg.model), (64,), 10, seed=0))
    per_update = sum(kept(v.size, 0.1) * (v.itemsize + 4) for v in state.values())
    # Execute
    plain_acc, plain_bytes, n = final(IID_DIGITS)
    acc, sent, m = final(IID_DIGITS + ["compression=topk", "compression.ratio=0.1"])
    int8_acc, int8_bytes, _ = final(IID_DIGITS + ["compression=int8"])
    # Assert: bytes exactly the formula; accuracy loosely (measured 0.847 vs 0.844 plain; 0.792 without feedback)
    assert m == n and sent == n * per_update
    assert int8_bytes == n * sum(v.size + 4 for v in state.values())
    assert plain_bytes / sent > 4.9
    assert acc >= plain_acc - 0.05, (acc, plain_acc)
    assert int8_acc >= plain_acc - 0.02, (int8_acc, plain_acc)


def test_compressed_runs_are_deterministic_and_vectorised_steps_compress_too() -> None:
    # Prepare
    over = SMOKE + ["scheme=fedprox", "compression=topk", "compression.ratio=0.3"]
    cols = ["round", "institution", "metric"]
    # Execute: twice as is (the vectorised local step), once one institution at a time
    a, again = (run(compose("config", over), backend="inprocess") for _ in range(2))
    one = run(compose("config", over + ["engine.vectorise=false"]), backend="inprocess")
    # Assert: bit-identical reruns; the unvectorised path sends the same bytes and scores the same up to the vmapped
    # matmuls' float32 summation order (tests/sim/test_batched.py), which 1e-4 absolute covers after 3 rounds
    values = [r.metrics.sort_values(cols)["value"].to_numpy() for r in (a, again, one)]
    np.testing.assert_array_equal(values[0], values[1])
    np.testing.assert_allclose(values[0], values[2], rtol=0, atol=1e-4)
    assert a.ledger.bytes_up.tolist() == again.ledger.bytes_up.tolist() == one.ledger.bytes_up.tolist()
    assert a.ledger.bytes_up.max() <= 0.61 * run(compose("config", SMOKE + ["scheme=fedprox"]),
                                                backend="inprocess").ledger.bytes_up.max()  # 0.3 * (4 + 4) / 4
