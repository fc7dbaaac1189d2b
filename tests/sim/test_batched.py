"""Batched local training (sim.core.batched) against the one-at-a-time path it replaces (sim.core.train.local_train)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from sim.core.batched import batchable, train_many
from sim.core.models import build_model, get_state, set_state
from sim.core.objective import Pull
from sim.core.train import local_train
from sim.core.types import TrainingSpec

LOGREG = {"_target_": "sim.core.models.logreg"}
MLP = {"_target_": "sim.core.models.mlp", "hidden": [16]}
CNN = {"_target_": "sim.core.models.cnn", "channels": [4], "hidden": 8}
SIZES = (5, 16, 37, 64, 3, 50, 21)  # batch 16: below one batch, exact multiples, and ragged last batches
# States are compared with atol 1e-5: batched (vmapped) and unbatched matmuls sum float32 products in a
# different order, which moves weights by ~1e-8 after a few dozen steps (measured: <= 5e-8); every
# setting under test (weight decay 1e-3, prox 0.1, momentum) moves them by >= 1e-4, far above it.
ATOL = 1e-5
RTOL_LOSS = 1e-5


def shards(sizes=SIZES, shape=(10,), classes=3, seed=0):
    """Random float32 inputs and int64 labels, one shard per size."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64)) for n in sizes]


def starts_for(cfg, k, shape=(10,), classes=3):
    """Different start states per institution (personal models), drawn from different seeds."""
    return [get_state(build_model(cfg, shape, classes, seed=s)) for s in range(k)]


def one_at_a_time(model, starts, data, keys, training, mu=0.0, anchors=None):
    """The reference: set_state + local_train + get_state per institution, as the host does today."""
    out = []
    for i, (x, y) in enumerate(data):
        set_state(model, starts[i])
        anchor = anchors[i] if anchors is not None else starts[i]
        loss, steps = local_train(model, x, y, training=training, key=keys[i], terms=(Pull(mu, anchor),))
        out.append((get_state(model), loss, steps))
    return out


def assert_same(ref, got):
    """Same keys, states within ATOL, losses within RTOL_LOSS (NaN matches NaN), identical step counts."""
    assert len(ref) == len(got)
    for (s_ref, l_ref, n_ref), (s_got, l_got, n_got) in zip(ref, got):
        assert list(s_ref) == list(s_got)
        for k in s_ref:
            assert s_got[k].dtype == s_ref[k].dtype and s_got[k].shape == s_ref[k].shape
            np.testing.assert_allclose(s_got[k], s_ref[k], rtol=0, atol=ATOL, err_msg=k)
        assert n_got == n_ref
        if np.isnan(l_ref):
            assert np.isnan(l_got)
        else:
            assert l_got == pytest.approx(l_ref, rel=RTOL_LOSS)


@pytest.mark.parametrize("cfg", [LOGREG, MLP], ids=["logreg", "mlp"])
@pytest.mark.parametrize("momentum,weight_decay,prox_mu", list(itertools.product([0.0, 0.9], [0.0, 1e-3], [0.0, 0.1])))
def test_train_many_equals_local_train(cfg, momentum, weight_decay, prox_mu) -> None:
    # Prepare: 7 institutions of unequal sizes, each from its own start
    training = TrainingSpec(local_epochs=2, batch_size=16, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    model, data = build_model(cfg, (10,), 3, seed=0), shards()
    starts, keys = starts_for(cfg, len(data)), [(0, i, 3) for i in range(len(data))]
    # Execute (max_batch=3: several chunks, the last one short)
    ref = one_at_a_time(model, starts, data, keys, training, prox_mu)
    got = train_many(model, starts, data, keys, training=training, mu=prox_mu, max_batch=3)
    # Assert
    assert [n for _, _, n in got] == [2 * -(-n // 16) for n in SIZES]
    assert_same(ref, got)


def test_tolerance_is_tight_enough_to_see_every_setting() -> None:
    # Prepare: what each setting changes in the reference path, measured against the plain run
    model, data = build_model(MLP, (10,), 3, seed=0), shards()
    starts, keys = starts_for(MLP, len(data)), [(0, i, 3) for i in range(len(data))]
    plain = TrainingSpec(local_epochs=2, batch_size=16, lr=0.1)
    base = one_at_a_time(model, starts, data, keys, plain)
    variants = [
        (TrainingSpec(local_epochs=2, batch_size=16, lr=0.1, weight_decay=1e-3), 0.0),
        (TrainingSpec(local_epochs=2, batch_size=16, lr=0.1, momentum=0.9), 0.0),
        (plain, 0.1),
    ]
    for training, mu in variants:
        # Execute
        other = one_at_a_time(model, starts, data, keys, training, mu)
        moved = max(np.abs(a[0][k] - b[0][k]).max() for a, b in zip(base, other) for k in a[0])
        # Assert: an ignored term would break the equality test by a wide margin
        assert moved > 10 * ATOL


def test_cnn_and_tensor_inputs_match() -> None:
    # Prepare: a conv net (vmapped Conv2d) on 8x8 images, shards given as torch tensors
    training = TrainingSpec(local_epochs=2, batch_size=8, lr=0.05, momentum=0.9)
    model, data = build_model(CNN, (1, 8, 8), 4, seed=0), shards((3, 8, 13, 20), (1, 8, 8), 4)
    starts, keys = starts_for(CNN, 4, (1, 8, 8), 4), [(1, i, 1) for i in range(4)]
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    # Execute
    ref = one_at_a_time(model, starts, data, keys, training)
    got = train_many(model, starts, tensors, keys, training=training, mu=0.0)
    # Assert
    assert_same(ref, got)


def test_partial_and_foreign_anchors_match() -> None:
    # Prepare: anchors that differ from the start, one naming only the head, one None (= the start)
    training = TrainingSpec(local_epochs=2, batch_size=16, lr=0.1)
    mu = 0.5
    model, data = build_model(MLP, (10,), 3, seed=0), shards(SIZES[:3])
    starts, keys = starts_for(MLP, 3), [(0, i, 2) for i in range(3)]
    other = get_state(build_model(MLP, (10,), 3, seed=99))
    anchors = [other, {"3.weight": other["3.weight"], "3.bias": other["3.bias"]}, None]
    # Execute
    ref = one_at_a_time(model, starts, data, keys, training, mu, anchors=[other, anchors[1], starts[2]])
    got = train_many(model, starts, data, keys, training=training, mu=mu, anchors=anchors)
    # Assert
    assert_same(ref, got)


def test_empty_shard_no_epochs_and_partial_starts() -> None:
    # Prepare: an empty shard, and a start that omits the head (set_state keeps the model's values)
    training = TrainingSpec(local_epochs=1, batch_size=16, lr=0.1)
    model, data = build_model(LOGREG, (10,), 3, seed=0), shards((0, 12))
    full = starts_for(LOGREG, 2, (10,), 3)
    starts = [full[0], {"1.weight": full[1]["1.weight"]}]
    before = get_state(model)
    # Execute
    got = train_many(model, starts, data, [(0, 0, 1), (0, 1, 1)], training=training, mu=0.0)
    ref = one_at_a_time(build_model(LOGREG, (10,), 3, seed=0), starts, data, [(0, 0, 1), (0, 1, 1)], training)
    idle = train_many(model, full, data, [(0, 0, 1), (0, 1, 1)],
                      training=TrainingSpec(local_epochs=0), mu=0.0)
    # Assert: nothing trained on the empty shard; the model lent for the architecture is left alone
    assert np.isnan(got[0][1]) and got[0][2] == 0
    assert all(np.array_equal(got[0][0][k], full[0][k]) for k in full[0])
    assert_same(ref, got)
    assert all(np.array_equal(v, before[k]) for k, v in get_state(model).items())
    assert all(np.isnan(loss) and steps == 0 for _, loss, steps in idle)


def test_deterministic_and_leaves_global_rng_alone() -> None:
    # Prepare
    training = TrainingSpec(local_epochs=2, batch_size=16, lr=0.1, momentum=0.9)
    model, data = build_model(MLP, (10,), 3, seed=0), shards()
    starts, keys = starts_for(MLP, len(data)), [(5, i, 1) for i in range(len(data))]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    # Execute
    a = train_many(model, starts, data, keys, training=training, mu=0.0)
    b = train_many(model, starts, data, keys, training=training, mu=0.0, max_batch=2)
    # Assert: same inputs -> identical numbers, whatever the chunking; callers' torch RNG untouched
    assert torch.equal(torch.rand(3), expected)
    for (sa, la, na), (sb, lb, nb) in zip(a, b):
        assert la == lb and na == nb and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_batchable_only_for_pure_fp32_sgd_models() -> None:
    # Prepare
    training = TrainingSpec()
    mlp = build_model(MLP, (10,), 3, seed=0)
    dropout = nn.Sequential(nn.Flatten(), nn.Linear(10, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    batchnorm = nn.Sequential(nn.Flatten(), nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    # Assert: the model and the training decide here; whether a scheme's step is plain SGD is its client half's say
    assert batchable(mlp, training) and batchable(build_model(CNN, (1, 8, 8), 4, seed=0), training)
    assert not batchable(dropout, training)
    assert not batchable(batchnorm, training)
    assert not batchable(mlp, TrainingSpec(precision="bf16"))
    assert not batchable(mlp, TrainingSpec(optimizer="adamw"))
    assert not batchable(mlp.double(), training)


def test_only_plain_and_proximal_client_halves_are_batched() -> None:
    from agents.schemes import SCHEMES

    # Assert: FedAvg's family with a pull batches; a second model, a kept head, a correction, a start loss or a
    # full-shard gradient do not
    plans = {name: SCHEMES[name]().plan(1) for name in ("fedavg", "fedprox", "isolated", "finetune", "fedavgm",
                                                           "ditto", "fedper", "scaffold", "qffl", "fedsgd")}
    batched_ = {name for name, plan in plans.items() if (plan.client is None or plan.client.batchable)}
    assert batched_ == {"fedavg", "fedprox", "isolated", "finetune", "fedavgm"}
    assert plans["fedprox"].client.pull() == 0.01 and plans["fedsgd"].upload == "gradient"


@pytest.mark.parametrize("cfg", [LOGREG, MLP, CNN], ids=["logreg", "mlp", "cnn"])
def test_an_institution_trains_the_same_whoever_shares_its_batch(cfg) -> None:
    # Prepare: the stacked step (linear stacks) and the vmapped one (CNN) both train the still-active suffix of a chunk
    shape = (1, 8, 8)
    training = TrainingSpec(local_epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)
    model, data = build_model(cfg, shape, 4, seed=0), shards((30, 3, 17, 9, 44, 1), shape, 4)
    starts, keys = starts_for(cfg, len(data), shape, 4), [(2, i, 1) for i in range(len(data))]
    pick = [4, 1, 3]
    # Execute
    everybody = train_many(model, starts, data, keys, training=training, mu=0.1)
    some = train_many(model, [starts[i] for i in pick], [data[i] for i in pick], [keys[i] for i in pick],
                      training=training, mu=0.1)
    alone = [train_many(model, [starts[i]], [data[i]], [keys[i]], training=training, mu=0.1)[0]
             for i in pick]  # a host with one cohort member (a vmapped convolution over one is an ungrouped one)
    # Assert: bit for bit, whatever else is in the cohort (the determinism contract across hosts)
    for j, i in enumerate(pick):
        for got in (some[j], alone[j]):
            assert got[1:] == everybody[i][1:]
            assert all(np.array_equal(got[0][k], everybody[i][0][k]) for k in got[0])


def test_evaluate_many_scores_like_evaluate_and_independently_of_the_other_sets() -> None:
    from sim.core.batched import EVAL_ROWS, evaluate_many, scorable
    from sim.core.train import evaluate

    # Prepare: small sets, an empty one, and one that spans two forward passes
    model = build_model(MLP, (10,), 3, seed=0)
    sets = shards((5, 64, 0, EVAL_ROWS + 7, 1))
    # Execute
    together = evaluate_many(model, sets)
    alone = [evaluate_many(model, [s])[0] for s in sets]
    # Assert
    assert scorable(model, "fp32") and not scorable(model, "bf16")
    assert not scorable(build_model(CNN, (1, 8, 8), 4, seed=0), "fp32")
    assert np.isnan(together[2][0]) and np.isnan(together[2][1])
    for k, (x, y) in enumerate(sets):
        if len(y):
            assert together[k] == alone[k]  # bit for bit: a set's numbers do not depend on the others
            acc, loss = evaluate(model, x, y)
            assert together[k][0] == acc and together[k][1] == pytest.approx(loss, rel=1e-6)


def test_scoring_rows_score_any_subset_in_its_order_and_pool_the_union_exactly() -> None:
    import torch

    from sim.core.batched import ScoringRows
    from sim.core.train import evaluate
    from sim.core.types import Scores

    # Prepare: one host's sets scored once for everybody
    model = build_model(MLP, (10,), 3, seed=0)
    sets = shards((9, 0, 40, 3, 17))
    rows = ScoringRows(sets, torch.device("cpu"), torch.float32)
    acc, loss, right, total = rows.score(model)
    # Execute: a subset in another order, and the union pooled from the sums
    picked = np.array([4, 0, 2])
    sub = rows.score(model, picked)
    names = np.arange(len(sets))  # scenario indices
    sizes = np.array([len(y) for _, y in sets], dtype=float)
    zero = np.zeros(len(sets))
    pooled = Scores(names, {"test_right": right, "test_rows": sizes, "test_loss_sum": total,
                            "val_right": zero, "val_rows": zero, "val_loss_sum": zero}).union()
    # Assert: a subset's numbers are everybody's, bit for bit; the union's accuracy is scoring the union's
    for j, k in enumerate(picked):
        assert (sub[0][j], sub[1][j]) == (acc[k], loss[k])
    x = np.concatenate([x for x, _ in sets])
    y = np.concatenate([y for _, y in sets])
    union_acc, union_loss = evaluate(model, x, y)
    assert pooled["accuracy"] == union_acc and pooled["loss"] == pytest.approx(union_loss, rel=1e-6)
    assert set(pooled) == {"accuracy", "loss"}  # no validation rows: no validation scores
    assert Scores(names, {"accuracy": acc}).union() is None  # no sums (scored on their own): nothing pooled


_CE_IDENTITY = """
import sys, torch, torch.nn.functional as F
from sim.core.batched import _vector_bytes, cross_entropy_rows
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
fast = 0
for dtype in (torch.float32, torch.float64):
    for classes in range(1, 20):
        for n in (1, 5, 63, 64, 65, 1000, 3265, 8192, 10001):
            for scale in (1e-3, 1.0, 40.0, 1e4):
                x = torch.randn(n, classes, generator=g, dtype=dtype) * scale
                y = torch.randint(0, classes, (n,), generator=g)
                assert torch.equal(cross_entropy_rows(x, y), F.cross_entropy(x, y, reduction="none")), (dtype, classes, n)
        fast += classes < _vector_bytes() // torch.empty((), dtype=dtype).element_size()
print(torch.backends.cpu.get_cpu_capability(), fast)
"""


@pytest.mark.parametrize("capability", [None, "avx2", "default"])
def test_cross_entropy_rows_is_the_library_cross_entropy_bit_for_bit(capability) -> None:
    import os
    import subprocess
    import sys

    # Prepare: this CPU's own kernels, and the AVX2 and plain ones ATen would pick on an older CPU
    env = dict(os.environ) | ({"ATEN_CPU_CAPABILITY": capability} if capability else {})
    # Execute: every class count, row counts around the padding and the kernel's chunks, two threads
    done = subprocess.run([sys.executable, "-c", _CE_IDENTITY], env=env, capture_output=True, text=True, timeout=300)
    # Assert: identical everywhere, and the fast path was taken where the classes fit one vector
    assert done.returncode == 0, done.stderr[-2000:]
    name, fast = done.stdout.split()
    assert int(fast) > 0 or name not in ("AVX512", "AVX2", "DEFAULT")


@pytest.mark.parametrize("cfg", [LOGREG, MLP, CNN], ids=["logreg", "mlp", "cnn"])
def test_a_large_shard_trains_in_a_call_of_its_own_with_the_same_numbers(cfg) -> None:
    from sim.core.batched import PADDED_PER_STEP, _chunks

    # Prepare: a power-law cohort in small: one shard of hundreds of steps beside a few of one or two
    shape = (1, 8, 8)
    training = TrainingSpec(local_epochs=1, batch_size=8, lr=0.1, momentum=0.9)
    model, data = build_model(cfg, shape, 4, seed=0), shards((9, 2400, 5, 16, 12), shape, 4)
    starts, keys = starts_for(cfg, len(data), shape, 4), [(3, i) for i in range(len(data))]
    steps = [-(-len(y) // 8) for _, y in data]
    order = sorted(range(len(data)), key=lambda i: steps[i])
    # Execute
    runs = _chunks(order, steps, 256)
    together = train_many(model, starts, data, keys, training=training)
    alone = [train_many(model, [s], [d], [k], training=training)[0] for s, d, k in zip(starts, data, keys)]
    # Assert: the large shard is cut off (padding the four small ones to its 300 steps costs more than its own
    # call), the small ones share one, a cap of two splits them, and every number is bit for bit its own
    assert runs == [[2, 0, 3, 4], [1]] and 4 * (300 - 2) > PADDED_PER_STEP * 2
    assert _chunks(order, steps, 2) == [[2, 0], [3, 4], [1]]
    for got, own in zip(together, alone):
        assert got[1:] == own[1:] and all(np.array_equal(got[0][k], own[0][k]) for k in got[0])
