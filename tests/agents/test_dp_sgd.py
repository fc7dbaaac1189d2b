"""Sample-level DP-SGD in one institution's local step (Opacus): clipping, noise, Poisson batches, epsilon, determinism.

Epsilons are compared with dp-accounting's own answer at ``rtol=0.01`` (the issue's 1%):
collabsim calls the same accountant, so the tolerance only absorbs a change of its default
RDP orders between releases; Opacus's own RDP accountant must agree to 1% as well. Everything
else is compared exactly: a run repeats bit for bit.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from dp_accounting import rdp
from omegaconf import OmegaConf, open_dict
from opacus.accountants import RDPAccountant
from stopping import Stop, stop_after
from torch import nn

from sim.core import dp_sgd
from sim.cli import compose
from sim.engine import run
from sim.core.models import build_model
from sim.core.train import local_train
from sim.core.types import TrainingSpec
from refusal import refused

SMALL = ["smoke=true", "rounds=3", "data.num_samples=600", "checkpoint_every=0", "results.select=last",
         "engine.backend=inprocess"]
DP_ROW = 1  # rural_clinic: the one institution with strict rules
Z, C, DELTA = 1.1, 0.5, 1e-6


def accountant_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's own answer, built here without collabsim's helpers."""
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


def mixed(extra: list[str] = ()) -> object:
    """The default scenario with one DP-SGD institution (row ``DP_ROW``), the others plain."""
    cfg = compose("config", SMALL + list(extra))
    with open_dict(cfg):
        row = cfg.scenario.institutions[DP_ROW]
        row.dp_noise_multiplier, row.dp_clip_norm, row.dp_delta = Z, C, DELTA
    return cfg


def mlp(inputs: int = 5, classes: int = 3) -> nn.Module:
    return build_model(OmegaConf.create({"_target_": "sim.core.models.mlp", "hidden": [8]}), (inputs,), classes, seed=0)


def batchnorm_net(input_shape, num_classes) -> nn.Module:
    """A model Opacus cannot privatise (BatchNorm mixes the samples of a batch); the config names it as a target."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dp: dp_sgd.DpSgd, expected: int, lr: float,
             extra=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """What one DP-SGD step through sim.core.dp_sgd does to each parameter: (w_after - w_before) / -lr."""
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    with dp_sgd.private(model, torch.optim.SGD(model.parameters(), lr=lr), dp, expected,
                        torch.Generator().manual_seed(seed)) as opt:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        dp_sgd.step(opt, loss, extra(model) if extra else torch.zeros(()))
    return {k: (before[k] - p.detach()) / lr for k, p in model.named_parameters()}


def test_each_samples_gradient_is_clipped_and_extra_terms_are_not() -> None:
    # Prepare: a batch whose per-sample gradients (plain autograd, one sample at a time) are mostly far above the bound,
    # and a FedProx pull towards a far anchor, which touches no data
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(16, 5) * 50, torch.randint(0, 3, (16,))
    anchor = {k: p.detach() + 3.0 for k, p in model.named_parameters()}
    mu, bound, expected = 0.7, 0.1, 20
    raw = []
    for i in range(16):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        raw.append({k: p.grad.clone() for k, p in model.named_parameters()})
    model.zero_grad()
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in r.values())) for r in raw])
    scale = (bound / (norms + 1e-6)).clamp(max=1.0)
    pull = {k: mu * (p.detach() - anchor[k]) for k, p in model.named_parameters()}
    # Execute: one zero-noise step with the proximal term
    moved = one_step(model, x, y, dp_sgd.DpSgd(0.0, bound), expected, lr=0.5,
                     extra=lambda m: 0.5 * mu * sum(((p - anchor[k]) ** 2).sum() for k, p in m.named_parameters()))
    # Assert: the step is (sum of clipped per-sample gradients) / expected batch + the unclipped pull;
    # without the pull it could move the model by at most bound * batch / expected
    assert (norms > bound).sum() > 10 and (norms < bound).any()  # most samples clipped, one left alone
    for k in moved:
        want = sum(s * r[k] for s, r in zip(scale, raw)) / expected + pull[k]
        torch.testing.assert_close(moved[k], want, rtol=1e-4, atol=1e-6)
    private = torch.sqrt(sum((moved[k] - pull[k]).pow(2).sum() for k in moved))
    assert private <= bound * 16 / expected * (1 + 1e-4)


def test_noise_has_the_configured_std_and_comes_from_the_seeded_generator() -> None:
    # Prepare: an empty Poisson batch, so the step is the noise alone: N(0, (z C)^2) / expected batch per parameter
    z, clip, expected = 2.0, 0.5, 4
    x, y = torch.zeros(0, 200), torch.zeros(0, dtype=torch.int64)

    def noise(seed: int) -> torch.Tensor:
        model = build_model(OmegaConf.create({"_target_": "sim.core.models.logreg"}), (200,), 10, seed=0)
        return torch.cat([v.flatten() for v in one_step(model, x, y, dp_sgd.DpSgd(z, clip), expected, 1.0, seed=seed).values()])

    # Execute: twice with one seed, once with another
    a, b, c = noise(0), noise(0), noise(1)
    # Assert: 2010 draws with std z C / B and mean 0 (4 standard errors); the same seed, the same noise
    std = z * clip / expected
    assert a.numel() == 2010 and float(a.std()) == pytest.approx(std, rel=0.06)
    assert abs(float(a.mean())) < 4 * std / math.sqrt(a.numel())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batches_are_seeded_poisson_samples_at_rate_batch_over_n() -> None:
    # Execute: a round of 3 epochs on 300 samples at batch 32, twice with one seed and once with another
    batches = dp_sgd.poisson_batches(300, 32, 3, torch.Generator().manual_seed(5))
    again = dp_sgd.poisson_batches(300, 32, 3, torch.Generator().manual_seed(5))
    other = dp_sgd.poisson_batches(300, 32, 3, torch.Generator().manual_seed(6))
    sizes = np.array([len(b) for b in batches])
    # Assert: the accountant's schedule, sizes that vary around q n = 32 (binomial sd ~5.2), distinct indices
    assert dp_sgd.schedule(300, 32, 3) == (32 / 300, 30) and len(batches) == 30
    assert len(set(sizes)) > 5 and abs(sizes.mean() - 32) < 4 * math.sqrt(32 * (1 - 32 / 300) / 30)
    assert all(len(set(b.tolist())) == len(b) and (b < 300).all() for b in batches)
    assert all(torch.equal(p, q) for p, q in zip(batches, again)) and any(len(p) != len(q) for p, q in zip(batches, other))


def test_local_train_takes_empty_batches_as_noise_steps() -> None:
    # Prepare: 40 samples at batch 1 (q = 1/40): about a third of the 40 steps draw nobody
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 5)).astype(np.float32), rng.integers(0, 3, 40)
    training, dp = TrainingSpec(batch_size=1, local_epochs=1, lr=0.1), dp_sgd.DpSgd(1.0, 1.0)
    empty = sum(len(b) == 0 for b in dp_sgd.poisson_batches(40, 1, 1, torch.Generator().manual_seed(0)))
    # Execute: twice from the same weights and key
    runs = []
    for _ in range(2):
        model = mlp()
        loss, steps = local_train(model, x, y, training=training, key=(0, 1, 1), dp=dp)
        runs.append((loss, steps, [p.detach().clone() for p in model.parameters()], model))
    # Assert: every step counted, a finite loss over the samples drawn, the same weights twice, no Opacus hooks left
    assert empty > 0 and runs[0][1] == 40 and math.isfinite(runs[0][0]) and runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][2], runs[1][2]))
    model = runs[0][3]
    assert not any(hasattr(p, a) for p in model.parameters() for a in ("grad_sample", "summed_grad", "_forward_counter"))
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dp_sgd_on_a_gpu_draws_its_noise_there_and_repeats() -> None:
    # Prepare: a model on the GPU (Opacus draws the noise on the parameters' device, with a generator seeded there)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 5)).astype(np.float32), rng.integers(0, 3, 200)
    training, dp = TrainingSpec(batch_size=16, local_epochs=1, lr=0.1), dp_sgd.DpSgd(1.0, 1.0)
    # Execute: twice from the same weights and key
    runs = []
    for _ in range(2):
        model = mlp().cuda()
        loss, steps = local_train(model, x, y, training=training, key=(0, 1, 1), dp=dp)
        runs.append((loss, steps, [p.detach().cpu() for p in model.parameters()]))
    # Assert: trained there, the same weights twice
    assert math.isfinite(runs[0][0]) and runs[0][1] == 13
    assert all(torch.equal(p, q) for p, q in zip(runs[0][2], runs[1][2]))


def test_ledger_epsilon_of_the_dp_institution_is_the_accountants_answer() -> None:
    # Execute
    out = run(mixed())
    # Assert: the DP institution's epsilon after round r composes r rounds of its local steps; the others have none
    ledger, cfg = out.ledger, mixed()
    name = cfg.scenario.institutions[DP_ROW].name
    own = ledger[(ledger.institution == name) & ledger.participated].sort_values("round")
    assert len(own) == 3
    n = int(own.samples.iloc[0])
    batch = min(cfg.training.batch_size, n)  # each step a Poisson sample at rate batch / n
    q, steps = batch / n, cfg.training.local_epochs * math.ceil(n / batch)  # per round
    for r, eps in zip(own["round"], own.epsilon):
        assert eps == pytest.approx(accountant_epsilon(Z, q, steps * int(r), DELTA), rel=0.01)
    opacus_rdp = RDPAccountant()  # Opacus's own accountant, told the same steps, agrees too
    opacus_rdp.history = [(Z, q, steps * int(own["round"].iloc[-1]))]
    assert own.epsilon.iloc[-1] == pytest.approx(opacus_rdp.get_epsilon(DELTA), rel=0.01)
    assert own.epsilon.is_monotonic_increasing
    assert ledger[ledger.institution != name].epsilon.isna().all()


def test_mixed_scenario_repeats_bit_for_bit() -> None:
    # Execute
    a, b = run(mixed()), run(mixed())
    # Assert: identical metrics and ledgers (but measured wall time) twice
    assert a.metrics.value.tolist() == b.metrics.value.tolist()
    wall = ["compute_seconds"]
    assert a.ledger.drop(columns=wall).equals(b.ledger.drop(columns=wall))


def test_the_dp_institution_trains_alike_with_and_without_the_vectorised_step() -> None:
    # Prepare: isolated training, so the plain institutions' float32 rounding (vectorised vs not) cannot reach it
    extra = ["scheme=isolated"]
    # Execute
    on, off = run(mixed(extra + ["engine.vectorise=true"])), run(mixed(extra + ["engine.vectorise=false"]))
    # Assert: the DP institution always trains on its own path: bit-identical numbers and epsilons either way
    name = mixed().scenario.institutions[DP_ROW].name
    assert on.metrics[on.metrics.institution == name].value.tolist() == \
        off.metrics[off.metrics.institution == name].value.tolist()
    assert on.ledger[on.ledger.institution == name].epsilon.tolist() == \
        off.ledger[off.ledger.institution == name].epsilon.tolist()


def test_plain_institutions_beside_a_dp_one_are_unchanged() -> None:
    # Prepare: isolated training, so nothing of the DP institution reaches the others
    extra = ["scheme=isolated"]
    # Execute
    mixed_run, plain = run(mixed(extra)), run(compose("config", SMALL + extra))
    # Assert: every number of the plain institutions is bit-identical to a run without the keys; the DP one's differ
    name = mixed().scenario.institutions[DP_ROW].name
    m, p = mixed_run.metrics, plain.metrics
    own = ~m.institution.isin([name, "global"])  # the global row averages every institution's model, the DP one's too
    others_m = m[own].drop(columns="run_id").reset_index(drop=True)  # run_id hashes the config, which differs
    others_p = p[~p.institution.isin([name, "global"])].drop(columns="run_id").reset_index(drop=True)
    assert len(others_m) and others_m.equals(others_p)
    assert m[m.institution == name].value.tolist() != p[p.institution == name].value.tolist()


def test_runs_without_dp_keys_are_unchanged() -> None:
    # A run with the DP keys set to nothing (scenario-level nulls) is bit-identical to one without them.
    base = run(compose("config", SMALL))
    cfg = compose("config", SMALL + ["+scenario.dp_noise_multiplier=null", "+scenario.dp_clip_norm=null"])
    again = run(cfg)
    assert base.metrics.value.tolist() == again.metrics.value.tolist()


def test_a_resumed_dp_run_matches_one_straight_through(tmp_path) -> None:
    # Prepare: every institution private (scenario-level keys); the steps taken so far are checkpointed state
    cfg = compose("config", ["smoke=false", "rounds=4", "data.num_samples=600", "checkpoint_every=1",
                             f"+scenario.dp_noise_multiplier={Z}", f"+scenario.dp_clip_norm={C}"])
    ref = run(cfg, tmp_path / "ref", backend="inprocess")
    # Execute: stop after round 2 and resume from its checkpoint
    with pytest.raises(Stop):
        run(cfg, tmp_path / "cut", backend="inprocess", on_round=stop_after(2))
    resumed = run(compose("config", [f"resume={tmp_path / 'cut'}"]), backend="inprocess")
    # Assert: identical metrics, and epsilons that keep growing from where they were
    pd.testing.assert_frame_equal(resumed.metrics, ref.metrics)
    eps = ["round", "institution", "epsilon"]
    pd.testing.assert_frame_equal(resumed.ledger[eps].reset_index(drop=True), ref.ledger[eps].reset_index(drop=True))


@pytest.mark.parametrize("override, named", [
    ("+scenario.dp_noise_multiplier=0", "scenario.dp_noise_multiplier"),
    ("+scenario.dp_noise_multiplier=-1", "scenario.dp_noise_multiplier"),
    ("+scenario.dp_clip_norm=0", "scenario.dp_clip_norm"),
    ("+scenario.dp_delta=1.5", "scenario.dp_delta"),
    ("+scenario.dp_noise_multiplier=1.0", "dp_clip_norm"),
])
def test_bad_dp_sgd_settings_give_one_line_before_anything_runs(override, named, capsys) -> None:
    err = refused([override], capsys)
    assert named in err


@pytest.mark.parametrize("overrides, named", [
    (["scheme=fedsgd"], "dp_noise_multiplier: DP-SGD privatises local SGD steps"),  # one full-shard gradient
    (["model=tiny_transformer", "data=docstrings"], "not supported for text/transformer models"),
    (["training.precision=bf16"], "training.precision"),
    (["model._target_=test_dp_sgd.batchnorm_net", "~model.hidden"], "model: DP-SGD"),  # Opacus refuses BatchNorm
])
def test_dp_sgd_where_it_cannot_apply_is_refused(overrides, named, capsys) -> None:
    err = refused(overrides + ["+scenario.dp_noise_multiplier=1.0", "+scenario.dp_clip_norm=1.0"], capsys)
    assert named in err
