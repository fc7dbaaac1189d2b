"""Pooled on Ray Train: batch mapping, resource planning, and the job itself (one worker per contributing institution)."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from agents.runtime.placement import plan_layout
from agents.runtime.ray_train import DataParallel, WorkerPlan
from sim.core.data_parallel import step_rows, steps_per_epoch
from sim.core import clock
from sim.cli import compose
from sim.checks import load_spec
from sim.core.models import build_model, get_state, set_state
from sim.core.train import evaluate, local_train
from sim.core.types import ConfigError, TrainingSpec

MLP = {"_target_": "sim.core.models.mlp", "hidden": [16]}
TRAINING = TrainingSpec(local_epochs=2, batch_size=32, lr=0.1)


def spec_of(*overrides):
    return load_spec(compose("config", ["smoke=true", "scheme=pooled", *overrides]))


def blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two separable classes in 5 dimensions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


# --- batches --------------------------------------------------------------------------


def test_each_step_takes_a_global_batch_of_at_most_batch_size_with_every_row_once_per_epoch():
    # Prepare: 300 pooled rows in shards of 200, 100 and 7 (fewer rows than steps), batch 32
    sizes = [200, 100, 7]
    steps = steps_per_epoch(sum(sizes), 32)
    # Execute
    rows = step_rows(sizes, steps)
    # Assert: the central trainer's step count; every row once; global batches within one row of N/S <= 32
    assert steps == 10 and rows.sum() == 307 and rows.max() - rows.min() <= len(sizes) and rows.max() <= 32
    assert rows.tolist() == [sum(len(c) for c in (np.array_split(np.arange(n), steps)[j] for n in sizes))
                             for j in range(steps)]


def test_scaled_worker_losses_average_to_the_gradient_of_the_global_batch():
    # Prepare: one step's global batch dealt to two workers (5 and 2 rows), as DDP would see them
    model = build_model(MLP, (5,), 2, seed=0)
    x, y = blobs(7)
    parts, k = [slice(0, 5), slice(5, 7)], 2

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in model.parameters()])

    # Execute: DDP's mean over workers of (summed loss * k / N_j), against the mean loss over the whole batch
    ddp = sum(grads(F.cross_entropy(model(torch.from_numpy(x[s])), torch.from_numpy(y[s]), reduction="sum") * k / 7)
              for s in parts) / k
    central = grads(F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))
    # Assert: equal to float32 rounding
    torch.testing.assert_close(ddp, central, rtol=1e-5, atol=1e-7)


# --- resources ------------------------------------------------------------------------


def test_the_layout_keeps_room_for_one_worker_per_institution_and_hosts_score_on_cpu():
    # Prepare: four institutions asking a quarter of a CPU and of a GPU each
    spec = spec_of("scheme.trainer=ray_train", "scenario.num_institutions=4", "scenario.cpus=0.25", "scenario.gpus=0.25",
                   "cluster.num_gpus=1")
    # Execute
    layout = plan_layout(spec, spec.scenario.institutions, cpus=2, gpus=1)
    # Assert: four workers with what each asked; hosts, coordinator and workers fit; the GPU goes to the workers
    assert layout.workers == WorkerPlan(4, 0.25, 0.25)
    assert sum(b.get("CPU", 0) for b in layout.bundles) <= 2 + 1e-9
    assert sum(b.get("GPU", 0) for b in layout.bundles) == 1 and all(h.gpus == 0 for h in layout.hosts)


@pytest.mark.parametrize("overrides, cpus, key", [
    (["scheme.trainer=ray_train", "engine.backend=inprocess"], 8, "scheme.trainer"),  # no Ray in-process
    (["scheme.trainer=ray_train"], 1, "scheme.trainer"),  # 1.3 CPUs of workers beside a 0.25-CPU coordinator
    (["scheme.trainer=gpu"], 8, "scheme.trainer"),
])
def test_an_impossible_trainer_is_refused_naming_the_key(overrides, cpus, key):
    with pytest.raises(ConfigError) as err:
        spec = spec_of(*overrides, f"cluster.num_cpus={cpus}")
        plan_layout(spec, spec.scenario.institutions, cpus=cpus, gpus=0)
    assert err.value.key == key


def test_auto_takes_ray_train_on_a_cluster_the_config_joins_whatever_its_size():
    local = spec_of()
    assert plan_layout(local, local.scenario.institutions, cpus=8, gpus=0).workers is None  # a local cluster: central
    joined = spec_of("cluster.address=auto")
    for cpus in (2, 8):  # the config decides, not the machine
        assert plan_layout(joined, joined.scenario.institutions, cpus=cpus, gpus=0).workers.workers == 6
    inproc = spec_of("engine.backend=inprocess", "cluster.address=auto")
    assert plan_layout(inproc, inproc.scenario.institutions, cpus=8, gpus=0).workers is None


# --- the job --------------------------------------------------------------------------


def rounds_of(trainer, state, x, y, parts, rounds=3):
    for r in range(1, rounds + 1):
        state, loss = trainer(state, x, y, (0, r, 7), parts)
        assert np.isfinite(loss)
    return state


def test_ray_train_follows_the_shards_repeats_itself_and_matches_central_accuracy(ray_cluster):
    # Prepare: a pool of three institutions' rows (200, none, 100), and a fresh model
    x, y = blobs(300)
    x_test, y_test = blobs(500, seed=1)
    model = build_model(MLP, (5,), 2, seed=0)
    start = get_state(model)
    parts = ((0, 200), (3, 0), (5, 100))
    trainer = DataParallel(WorkerPlan(3, 0.5, 0.0), model=MLP, shape=((5,), 2), training=TRAINING, seed=0, threads=1)
    # Execute: round 1 on a fresh job, three rounds on it, round 1 once more, and three rounds of the central trainer
    try:
        fresh = rounds_of(trainer, start, x, y, parts, rounds=1)
        a = rounds_of(trainer, start, x, y, parts)
        again = rounds_of(trainer, start, x, y, parts, rounds=1)
        first = rounds_of(trainer, start, x, y, parts[:1] + parts[2:], rounds=1)  # the same pool: no new job
        workers, jobs = trainer.world, trainer.jobs
    finally:
        trainer.close()
    central = start
    for r in range(1, 4):
        set_state(model, central)
        local_train(model, x, y, training=TRAINING, key=(0, r, 7))
        central = get_state(model)
    # Assert: a worker per institution with rows; a round gives the same weights whatever the job did before (what a
    # resumed run, which starts a new job from the checkpointed pool and state, relies on); accuracy as central's
    assert workers == 2 and jobs == 1
    assert all(np.array_equal(again[k], first[k]) and np.array_equal(fresh[k], first[k]) for k in again)
    accuracy = {}
    for name, state in (("ray_train", a), ("central", central)):
        set_state(model, state)
        accuracy[name] = evaluate(model, x_test, y_test)[0]
    # Both learn the separable blobs (>0.9); batches differ (stratified by institution), so equal to 0.03, not bitwise
    assert accuracy["central"] > 0.9 and abs(accuracy["ray_train"] - accuracy["central"]) < 0.03


def test_a_pooled_run_on_ray_train_books_the_contributors_and_learns(small_cfg, ray_cluster, tmp_path):
    # (Resuming restarts the job from the checkpointed pool and global state; that a round's result depends on those
    # and its key alone, not on the job's history, is checked in the direct test above: one job start here, not three.)
    # Prepare: three institutions of which two hand over their data (cohort_fraction 0.6 -> 2), one host actor
    from sim.core.data import build_federation
    from sim.engine import run
    from sim.core.models import model_flops

    cfg = small_cfg("scheme=pooled", "scheme.trainer=ray_train", "scheme.cohort_fraction=0.6", "placement=pooled",
                    "engine.pooled_hosts=1", "scenario.num_institutions=3", "scenario.cpus=0.5", "cluster.num_cpus=4",
                    "checkpoint_every=0")
    spec = load_spec(cfg)
    # Execute
    result = run(cfg, tmp_path / "ref")
    # Assert: the global row trains every round at the two contributors' combined compute
    ledger = result.ledger
    contributors = set(ledger[(ledger["round"] == 1) & (ledger.bytes_up > 0)].institution)
    assert len(contributors) == 2
    rate = sum(clock.flops_rate(s) for s in spec.scenario.institutions if s.name in contributors)
    glob = ledger[ledger.institution == "global"]
    fed = build_federation(spec.data, spec.scenario, spec.seed, smoke=spec.smoke, model=spec.model)
    flops = model_flops(build_model(spec.model, fed.input_shape, fed.num_classes, seed=spec.seed), fed.input_shape)
    np.testing.assert_allclose(glob.simulated_seconds, clock.TRAIN_COST * glob.samples * flops / rate, rtol=1e-9)
    acc = result.metrics.query("institution == 'global' and metric == 'accuracy'").value
    assert acc.iloc[-1] > acc.iloc[0]  # it learned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pooled_on_ray_train_shares_a_gpu_between_two_workers(tmp_path):
    # Two institutions with half a GPU each: two workers on one device, so gloo (nccl needs a GPU per rank)
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "sim", "smoke=true", "scheme=pooled", "scheme.trainer=ray_train",
         "scenario.num_institutions=2", "scenario.gpus=0.5", "engine.gpu_policy=require", "placement=pooled",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ledger = pd.read_parquet(tmp_path / "run" / "ledger.parquet")
    assert ledger.query("institution == 'global'").samples.gt(0).all()
