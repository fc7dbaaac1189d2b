"""Aggregation maths on tiny hand-made states, Prepare / Execute / Assert.

Tolerances: known answers built from small exactly-representable numbers are compared
with ``rtol=1e-6`` (float32 rounding of a float64 mean is < 6e-8 relative); "exactly
deterministic" claims are checked with ``np.array_equal`` (bit-identical).
"""

from __future__ import annotations

import numpy as np
import pytest

from agents.schemes.aggregate import apply_gradient, concatenate, server_step, uniform_average, weighted_average

F32_RTOL = 1e-6  # float32 has ~7 significant digits; one rounding of a float64 result stays well inside this


def test_weighted_average_known_answer() -> None:
    # Prepare: two states, weights 1 and 3
    a = {"w": np.array([0.0, 4.0], np.float32), "b": np.array([1.0], np.float32)}
    b = {"w": np.array([4.0, 8.0], np.float32), "b": np.array([5.0], np.float32)}
    # Execute
    out = weighted_average([a, b], [1.0, 3.0])
    # Assert: (1*a + 3*b) / 4
    np.testing.assert_allclose(out["w"], [3.0, 7.0], rtol=F32_RTOL)
    np.testing.assert_allclose(out["b"], [4.0], rtol=F32_RTOL)


def test_uniform_average_is_plain_mean() -> None:
    # Prepare
    states = [{"w": np.full((2, 2), v, np.float32)} for v in (1.0, 2.0, 6.0)]
    # Execute
    out = uniform_average(states)
    # Assert
    np.testing.assert_allclose(out["w"], np.full((2, 2), 3.0), rtol=F32_RTOL)


def test_partial_keys_average_over_carriers_and_step_keeps_the_rest() -> None:
    # Prepare: only the first update carries "head"; the global state has a key nobody sends
    glob = {"body": np.zeros(2, np.float32), "head": np.zeros(1, np.float32), "frozen": np.array([9.0], np.float32)}
    u1 = {"body": np.array([2.0, 2.0], np.float32), "head": np.array([6.0], np.float32)}
    u2 = {"body": np.array([4.0, 4.0], np.float32)}
    # Execute
    avg = weighted_average([u1, u2], [1.0, 1.0])
    new = server_step(glob, avg, 1.0)
    # Assert: head is u1's alone (weights renormalised per key); frozen keeps its global value
    np.testing.assert_allclose(avg["body"], [3.0, 3.0], rtol=F32_RTOL)
    np.testing.assert_allclose(avg["head"], [6.0], rtol=F32_RTOL)
    assert set(new) == set(glob)
    np.testing.assert_array_equal(new["frozen"], glob["frozen"])


def test_dtype_preserved_per_array() -> None:
    # Prepare: mixed dtypes, including an integer counter (BatchNorm's num_batches_tracked)
    a = {"w": np.array([1.0], np.float32), "d": np.array([1.0], np.float64), "n": np.array(3, np.int64)}
    b = {"w": np.array([2.0], np.float32), "d": np.array([2.0], np.float64), "n": np.array(4, np.int64)}
    # Execute
    out = weighted_average([a, b], [1.0, 2.0])
    stepped = server_step(a, out, 0.5)
    grad = apply_gradient(a, {"w": np.array([1.0], np.float32)}, 0.1)
    # Assert
    for result in (out, stepped):
        assert {k: v.dtype for k, v in result.items()} == {"w": np.float32, "d": np.float64, "n": np.int64}
    assert out["n"] == 4  # (3 + 2*4) / 3 = 3.67 rounds to 4 instead of truncating to 3
    assert grad["w"].dtype == np.float32


def test_order_changes_result_only_within_float_tolerance() -> None:
    # Prepare: random states whose float sums are order-sensitive in the last bits
    rng = np.random.default_rng(0)
    states = [{"w": rng.normal(size=50).astype(np.float32)} for _ in range(7)]
    weights = rng.uniform(1, 100, size=7).tolist()
    perm = rng.permutation(7)
    # Execute
    forward = weighted_average(states, weights)
    shuffled = weighted_average([states[i] for i in perm], [weights[i] for i in perm])
    # Assert: float64 accumulation makes any reordering agree to float32 precision
    np.testing.assert_allclose(forward["w"], shuffled["w"], rtol=F32_RTOL, atol=1e-7)


def test_fixed_order_is_bit_identical() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    states = [{"w": rng.normal(size=(8, 3)).astype(np.float32)} for _ in range(5)]
    weights = rng.uniform(1, 10, size=5).tolist()
    # Execute
    first = weighted_average(states, weights)
    second = weighted_average([dict(s) for s in states], list(weights))
    # Assert
    assert np.array_equal(first["w"], second["w"])


def test_server_step_interpolates_and_lr_one_replaces_exactly() -> None:
    # Prepare
    old = {"w": np.array([0.0, 10.0], np.float32)}
    target = {"w": np.array([2.0, 0.1], np.float32)}
    # Execute
    half = server_step(old, target, 0.5)
    full = server_step(old, target, 1.0)
    # Assert
    np.testing.assert_allclose(half["w"], [1.0, 5.05], rtol=F32_RTOL)
    assert np.array_equal(full["w"], target["w"])


def test_apply_gradient_known_step_leaves_other_keys() -> None:
    # Prepare
    state = {"w": np.array([1.0, 2.0], np.float32), "buf": np.array([7.0], np.float32)}
    grad = {"w": np.array([0.5, -1.0], np.float32)}
    # Execute
    out = apply_gradient(state, grad, lr=0.5)
    # Assert
    np.testing.assert_allclose(out["w"], [0.75, 2.5], rtol=F32_RTOL)
    np.testing.assert_array_equal(out["buf"], state["buf"])


def test_concatenate_keeps_given_order() -> None:
    # Prepare
    a = {"x": np.zeros((2, 3), np.float32), "y": np.array([0, 1])}
    b = {"x": np.ones((1, 3), np.float32), "y": np.array([2])}
    # Execute
    out = concatenate([a, b])
    # Assert
    assert out["x"].shape == (3, 3)
    np.testing.assert_array_equal(out["y"], [0, 1, 2])


@pytest.mark.parametrize(
    "states, weights",
    [
        ([], []),  # nothing to average
        ([{"w": np.ones(1)}], [1.0, 2.0]),  # length mismatch
        ([{"w": np.ones(1)}], [-1.0]),  # negative weight
        ([{"w": np.ones(1)}], [0.0]),  # zero total weight
        ([{"w": np.ones(1)}, {"w": np.ones(2)}], [1.0, 1.0]),  # shapes disagree
    ],
)
def test_weighted_average_rejects_bad_input(states, weights) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        weighted_average(states, weights)


def test_server_step_rejects_keys_the_global_state_lacks() -> None:
    # Execute / Assert: an unknown name is a bug in the sender, not something to adopt silently
    with pytest.raises(ValueError, match="stray"):
        server_step({"w": np.ones(1)}, {"stray": np.ones(1)})
