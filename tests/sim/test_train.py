"""Local training, full-shard gradients and evaluation on tiny toy problems."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from sim.core.models import build_model, get_state, set_state
from sim.core.objective import Pull, Shift
from sim.core.train import evaluate, full_gradient, local_train, numpy_rng_for, rng_for
from sim.core.types import TrainingSpec

LOGREG = {"_target_": "sim.core.models.logreg"}
SPEC = TrainingSpec(local_epochs=2, batch_size=16, lr=0.1)


def blobs(n: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian blobs in 4-D (linearly separable with overwhelming probability)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n).astype(np.int64)
    x = rng.normal(size=(n, 4)).astype(np.float32) * 0.5 + (2.0 * y[:, None] - 1.0) * 2.0
    return x.astype(np.float32), y


def fresh(seed: int = 0, classes: int = 2) -> nn.Module:
    """A seeded logistic regression on 4 features."""
    return build_model(LOGREG, (4,), classes, seed=seed)


def distance(state: dict, anchor: dict) -> float:
    """Euclidean distance between two states over their shared keys."""
    return float(np.sqrt(sum(((state[k].astype(np.float64) - anchor[k]) ** 2).sum() for k in anchor)))


def test_rng_for_is_a_pure_function_of_the_key() -> None:
    # Execute
    (n1, t1), (n2, t2), (n3, _) = rng_for((0, 1, 2)), rng_for((0, 1, 2)), rng_for((0, 1, 3))
    # Assert
    assert n1.integers(1 << 30) == n2.integers(1 << 30)
    assert torch.equal(torch.rand(3, generator=t1), torch.rand(3, generator=t2))
    assert n3.integers(1 << 30, size=4).tolist() != rng_for((0, 1, 2))[0].integers(1 << 30, size=4).tolist()


def test_numpy_rng_for_is_rng_for_s_numpy_stream() -> None:
    # Execute / Assert: the vectorised step draws its minibatches from it, so it must be the very same stream
    for key in [(0,), (3, 17, 2), (2**31, 5, 9, 1)]:
        assert numpy_rng_for(key).integers(1 << 30, size=50).tolist() == rng_for(key)[0].integers(1 << 30, size=50).tolist()


def test_local_train_same_key_identical_weights_other_key_differs() -> None:
    # Prepare
    x, y = blobs()
    models = [fresh() for _ in range(3)]
    # Execute
    r0 = local_train(models[0], x, y, training=SPEC, key=(0, 1, 1))
    r1 = local_train(models[1], x, y, training=SPEC, key=(0, 1, 1))
    local_train(models[2], x, y, training=SPEC, key=(0, 1, 2))
    s0, s1, s2 = (get_state(m) for m in models)
    # Assert: bit-identical for the same key; the shuffling of another key changes the weights
    assert r0 == r1
    assert all(np.array_equal(s0[k], s1[k]) for k in s0)
    assert any(not np.array_equal(s0[k], s2[k]) for k in s0)


def test_local_train_reduces_loss_and_counts_steps() -> None:
    # Prepare
    x, y = blobs()
    model = fresh()
    _, loss_before = evaluate(model, x, y)
    # Execute
    train_loss, steps = local_train(model, x, y, training=SPEC, key=(0, 0, 0))
    acc, loss_after = evaluate(model, x, y)
    # Assert: 2 epochs x ceil(128 / 16) steps; the blobs are separable, so training fits them
    assert steps == 2 * 8
    assert np.isfinite(train_loss)
    assert loss_after < 0.5 * loss_before
    assert acc >= 0.95


def test_local_train_leaves_global_rng_alone() -> None:
    # Prepare
    x, y = blobs(32)
    before = torch.get_rng_state()
    # Execute
    local_train(fresh(), x, y, training=SPEC, key=(1, 2, 3))
    # Assert
    assert torch.equal(torch.get_rng_state(), before)


def test_prox_term_pulls_towards_the_anchor() -> None:
    # Prepare: anchor = the starting (global) weights
    x, y = blobs()
    plain, prox = fresh(), fresh()
    anchor = get_state(plain)
    # Execute
    local_train(plain, x, y, training=SPEC, key=(0, 1, 0))
    local_train(prox, x, y, training=SPEC, key=(0, 1, 0), terms=(Pull(1.0, anchor),))
    # Assert: same shuffling, the only difference is the pull, so the FedProx model stays closer
    assert distance(get_state(prox), anchor) < distance(get_state(plain), anchor)


def test_a_shift_term_moves_each_step_by_its_correction() -> None:
    # Prepare: one full-batch SGD step, with and without the linear term <w, c> (SCAFFOLD's correction)
    x, y = blobs(40)
    plain, shifted = fresh(), fresh()
    c = {k: np.full_like(v, 0.5) for k, v in get_state(plain).items()}
    one = replace(SPEC, batch_size=40, local_epochs=1)
    # Execute
    local_train(plain, x, y, training=one, key=(0, 0, 0))
    _, steps = local_train(shifted, x, y, training=one, key=(0, 0, 0), terms=(Shift(c),))
    # Assert: the gradient of <w, c> is c, so the step differs by exactly -lr * c (1e-6: float32 rounding of O(1) weights)
    assert steps == 1
    for k, v in get_state(plain).items():
        np.testing.assert_allclose(get_state(shifted)[k], v - one.lr * c[k], atol=1e-6)


def test_full_gradient_matches_finite_differences() -> None:
    # Prepare: float64 model so central differences are accurate (truncation ~eps^2, rounding ~1e-16/eps)
    x, y = blobs(24)
    x[:, 0] *= 0.1  # keep logits moderate so the loss is not flat
    model = fresh(classes=3).double()
    y = (np.arange(24) % 3).astype(np.int64)
    eps = 1e-6
    # Execute
    grad, loss = full_gradient(model, x, y)
    # Assert: every coordinate of every parameter against (L(w+eps) - L(w-eps)) / 2eps
    _, base_loss = evaluate(model, x, y)
    assert loss == pytest.approx(base_loss, rel=1e-9)
    assert set(grad) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        numeric = np.zeros(param.shape)
        for i in np.ndindex(*param.shape):
            with torch.no_grad():
                param[i] += eps
                up = evaluate(model, x, y)[1]
                param[i] -= 2 * eps
                down = evaluate(model, x, y)[1]
                param[i] += eps
            numeric[i] = (up - down) / (2 * eps)
        # 1e-5 absolute: the returned gradient is float32 (relative error ~6e-8 on O(1) values),
        # the finite difference is accurate to ~1e-9 in float64
        np.testing.assert_allclose(grad[name], numeric, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_full_gradient_skips_frozen_parameters() -> None:
    # Prepare
    model = fresh()
    model[1].bias.requires_grad_(False)
    x, y = blobs(8)
    # Execute
    grad, _ = full_gradient(model, x, y)
    # Assert
    assert set(grad) == {"1.weight"}


def test_evaluate_known_accuracy_and_loss() -> None:
    # Prepare: logits = x, so the predicted class is the argmax of the input
    model = nn.Sequential(nn.Identity(), nn.Linear(2, 2, bias=False))
    set_state(model, {"1.weight": np.eye(2, dtype=np.float32)})
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    y = np.array([0, 1, 1, 1], np.int64)  # three right, one wrong
    # Execute
    acc, loss = evaluate(model, x, y, batch_size=3)  # batch 3 checks the ragged last batch
    # Assert: CE of a right answer is log(1+e^-1), of a wrong one log(1+e^1)
    right, wrong = np.log1p(np.exp(-1.0)), np.log1p(np.exp(1.0))
    assert acc == 0.75
    assert loss == pytest.approx((3 * right + wrong) / 4, rel=1e-6)  # float32 logits: ~1e-7 relative
    assert model.training  # mode restored


def test_empty_shard_is_reported_not_crashed() -> None:
    # Prepare
    x, y = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    # Execute
    loss, steps = local_train(fresh(), x, y, training=SPEC, key=(0,))
    acc, eval_loss = evaluate(fresh(), x, y)
    # Assert
    assert steps == 0 and np.isnan(loss) and np.isnan(acc) and np.isnan(eval_loss)
