"""Secure aggregation: masks cancel, the coordinator sees only masked vectors, dropouts are unmasked, bytes are booked.

The merged model is compared with plain FedAvg's at ``atol=1e-5`` (the issue's bound);
fixed-point encoding rounds each value to 2^-32, so the float64 sums agree to ~1e-9 and
what remains is one float32 rounding of the result.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from agents.schemes import secagg
from agents.schemes.dp_fedavg import DPFedAvg
from agents.schemes.fedavg import FedAvg
from agents.wrappers import wrap
from agents.wrappers.robust import Median
from agents.wrappers.secagg import SecureAggregation
from sim.cli import compose, guard
from sim.checks import load_spec
from sim.engine import run
from sim.core.faults import FAILED, UNAVAILABLE
from sim.core.types import ConfigError, RoundContext, Update

NAMES = tuple(f"inst{i}" for i in range(5))
SMALL = ["smoke=true", "rounds=3", "data.num_samples=600", "checkpoint_every=0", "results.select=last"]


def updates(seed: int = 0) -> tuple[dict, list[Update]]:
    """A global state with a float and an integer key, and five updates near it with different sample counts."""
    rng = np.random.default_rng(seed)
    glob = {"w": rng.normal(size=(6, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
    ups = [Update(institution=n, index=i, num_samples=10 * (i + 1), train_loss=0.0, compute_seconds=0.0, bytes_up=0,
                  state={k: (v + rng.normal(size=v.shape) * 0.1).astype(np.float32) for k, v in glob.items()})
           for i, n in enumerate(NAMES)]
    return glob, ups


def sealed(scheme, ctx: RoundContext, glob: dict, ups: list[Update]) -> list[Update]:
    """The updates as the institutions' hosts send them under ``scheme``'s plan (its client halves: masked when
    secure aggregation wraps it)."""
    ctx = replace(ctx, plan=scheme.plan(ctx.round))
    for step in ctx.plan.send:
        ups = [step(None, ctx, glob, u) for u in ups]
    return ups


# --- the pure protocol ----------------------------------------------------------------


def test_pairwise_masks_cancel_in_the_sum_and_hide_each_vector() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    vectors = [rng.normal(size=50) for _ in range(4)]
    # Execute
    masked = {i: secagg.mask(secagg.encode(v), i, 4, seed=3, round=2) for i, v in enumerate(vectors)}
    total = secagg.unmask_sum(masked, 4, seed=3, round=2)
    # Assert: the sum is exact to the fixed-point step (2^-32 per value, 4 values), each masked vector is noise
    np.testing.assert_allclose(total, np.sum(vectors, axis=0), rtol=0, atol=4 * 2.0**-32)
    for i, v in enumerate(vectors):
        seen = secagg.decode(masked[i])
        assert np.median(np.abs(seen - v)) > 1e6  # uniform on the 2^64 ring: typically ~2^30 away after decoding


def test_dropped_members_masks_are_removed_in_the_unmasking_round() -> None:
    # Prepare: 5 members agree masks, members 1 and 3 drop out before sending their masked vectors
    rng = np.random.default_rng(2)
    vectors = [rng.normal(size=20) for _ in range(5)]
    masked = {i: secagg.mask(secagg.encode(vectors[i]), i, 5, seed=0, round=1) for i in (0, 2, 4)}
    # Execute
    total = secagg.unmask_sum(masked, 5, seed=0, round=1)
    # Assert: the survivors' sum; with only 2 of 5 left (threshold 3) the round is refused
    np.testing.assert_allclose(total, vectors[0] + vectors[2] + vectors[4], rtol=0, atol=3 * 2.0**-32)
    with pytest.raises(ValueError, match="needs 3"):
        secagg.unmask_sum({0: masked[0], 2: masked[2]}, 5, seed=0, round=1)


def test_masks_depend_on_seed_round_and_pair_only() -> None:
    a = secagg.pair_mask(0, 1, 0, 1, 8)
    assert np.array_equal(a, secagg.pair_mask(0, 1, 0, 1, 8))
    assert not np.array_equal(a, secagg.pair_mask(0, 2, 0, 1, 8)) and not np.array_equal(a, secagg.pair_mask(0, 1, 0, 2, 8))
    with pytest.raises(ValueError):
        secagg.encode(np.array([secagg.LIMIT]))


def test_overhead_formula() -> None:
    n, words, k, c = 5, 100, secagg.KEY_BYTES, secagg.CIPHERTEXT_BYTES
    assert secagg.overhead(n, words, True) == (2 * k + 4 * c + 100 * 8 + 4 * k, 4 * (2 * k + c) + 5 * secagg.ID_BYTES)
    assert secagg.overhead(n, words, False) == (2 * k + 4 * c, 4 * (2 * k + c))


# --- FedAvg wrapped in secure aggregation ---------------------------------------------------


def test_coordinator_sees_only_masked_updates_and_merges_like_fedavg(monkeypatch) -> None:
    # Prepare: record every vector the coordinator adds up
    glob, ups = updates()
    ctx = RoundContext(round=1, seed=0, cohort=NAMES)
    seen: list[np.ndarray] = []
    real = secagg.unmask_sum
    monkeypatch.setattr(secagg, "unmask_sum", lambda masked, *a: seen.extend(masked.values()) or real(masked, *a))
    scheme = SecureAggregation(FedAvg())
    arrived = sealed(scheme, ctx, glob, ups)
    # Execute
    plain = FedAvg().merge(ctx, glob, ups)
    secure = scheme.merge(ctx, glob, arrived)
    # Assert: the same model to 1e-5; what the coordinator saw is nowhere near any true weighted change
    for k in glob:
        np.testing.assert_allclose(secure[k], plain[k], rtol=0, atol=1e-5)
    assert len(seen) == 5 and all(set(u.state) == {secagg.MASKED} for u in arrived)  # nothing else left the hosts
    with pytest.raises(ValueError, match="arrived unmasked"):
        scheme.merge(ctx, glob, ups)
    for vector, u in zip(seen, ups):
        true = np.append(np.concatenate([(u.state[k] - glob[k]).ravel() * u.num_samples for k in glob]), u.num_samples)
        assert np.min(np.abs(secagg.decode(vector) - true)) > 1.0


def test_a_member_failing_after_masking_is_unmasked_and_the_round_merges() -> None:
    # Prepare: inst2 failed mid-round (it had agreed masks), inst4 was offline from the start
    glob, ups = updates(3)
    ctx = RoundContext(round=2, seed=5, cohort=("inst0", "inst1", "inst3"), dropped=(("inst2", FAILED), ("inst4", UNAVAILABLE)))
    arrived = [u for u in ups if u.institution in ctx.cohort]
    scheme = SecureAggregation(FedAvg())
    # Execute
    secure = scheme.merge(ctx, glob, sealed(scheme, ctx, glob, arrived))
    # Assert: key agreement had 4 members; the survivors' FedAvg comes out
    assert secagg.members(ctx) == ["inst0", "inst1", "inst2", "inst3"]
    plain = FedAvg().merge(ctx, glob, arrived)
    for k in glob:
        np.testing.assert_allclose(secure[k], plain[k], rtol=0, atol=1e-5)
    # ... and with 2 of 5 left the protocol loses the round: the global model stays
    lost = RoundContext(round=2, seed=5, cohort=("inst0", "inst1", "inst3", "inst4"), dropped=(("inst2", FAILED),))
    assert scheme.merge(lost, glob, sealed(scheme, lost, glob, ups[:2])) is None


def test_dp_under_secure_aggregation_equals_dp_in_the_clear() -> None:
    glob, ups = updates(4)
    ctx = RoundContext(round=1, seed=0, cohort=NAMES)
    plain = DPFedAvg(noise_multiplier=1.0, clip_norm=0.1)
    secure = wrap(DPFedAvg(noise_multiplier=1.0, clip_norm=0.1),
                  {"secagg": {"_target_": "agents.wrappers.secagg.SecureAggregation"}})  # inside the DP layer
    plain.check(NAMES), secure.check(NAMES)  # five institutions: the noise is scaled by q * 5
    a, b = plain.merge(ctx, glob, ups), secure.merge(ctx, glob, sealed(secure, ctx, glob, ups))
    for k in glob:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["fedprox", "fedavgm", "fedadam", "fedyogi"])
def test_fedavg_family_under_secure_aggregation_equals_the_scheme_in_the_clear(name) -> None:
    # Prepare: three rounds, so server momentum / adaptive moments carry secure sums forward too
    from agents.schemes.base import SCHEMES

    glob, ups = updates(6)
    plain, secure = SCHEMES[name](), SecureAggregation(SCHEMES[name]())
    a = b = glob
    # Execute
    for r in (1, 2, 3):
        ctx = RoundContext(round=r, seed=2, cohort=NAMES)
        a, b = plain.merge(ctx, a, ups), secure.merge(ctx, b, sealed(secure, ctx, b, ups))
    # Assert: the same model to within 1e-5 (fixed-point masks round at 2^-32)
    for k in glob:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5)
    ctx = RoundContext(round=1, seed=2, cohort=NAMES)
    assert secure.cost(ctx, sealed(secure, ctx, glob, ups)).extras  # and the protocol's bytes are booked


def test_robust_merges_are_refused_under_secure_aggregation(capsys) -> None:
    with pytest.raises(ConfigError, match="secagg=masked cannot wrap scheme fedavg with aggregator=median"):
        SecureAggregation(Median(FedAvg()))
    with pytest.raises(SystemExit) as exit_:
        guard("config", ["aggregator=krum", "secagg=masked"], load_spec)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: secagg: ") and "aggregator=krum" in err


# --- end to end: the ledger -----------------------------------------------------------


def test_secure_run_matches_fedavg_and_books_the_protocols_bytes() -> None:
    # Prepare: institutions fail mid-round now and then (seed 0: one in round 2, two of six in round 3, so 4 survive,
    # the protocol's threshold; at 0.2 three fail in round 3 and secure aggregation rightly loses that round)
    extra = SMALL + ["scenario.failure_rate=0.15"]
    plain = run(compose("config", extra), backend="inprocess")
    secure = run(compose("config", extra + ["secagg=masked"]), backend="inprocess")
    failed = plain.ledger[plain.ledger.status == "failed"].groupby("round").size()
    assert failed.sum() >= 2 and failed.max() <= 6 - secagg.threshold(6)
    # Assert: the same scores (to float32 rounding of 1e-5-equal models), more bytes, exactly the formula's
    np.testing.assert_allclose(secure.metrics.value, plain.metrics.value, rtol=0, atol=1e-4)
    p, s = (t.ledger.set_index(["round", "institution"]).sort_index() for t in (plain, secure))
    for (r, name), row in s.iterrows():
        base = p.loc[(r, name)]
        if row.status == "ok":
            n = (s.loc[r].status.isin(["ok", "failed"])).sum()
            params = base.bytes_up // 4  # the MLP's float32 weights, all of them uploaded
            up, down = secagg.overhead(n, params + 1, True)  # the masked vector carries the weight too
            assert (row.bytes_up, row.bytes_down) == (up, base.bytes_down + down)  # it replaces the plain upload
        elif row.status == "failed":
            n = (s.loc[r].status.isin(["ok", "failed"])).sum()
            assert (row.bytes_up - base.bytes_up, row.bytes_down - base.bytes_down) == secagg.overhead(n, 0, False)
        else:
            assert (row.bytes_up, row.bytes_down) == (base.bytes_up, base.bytes_down)
    assert (s.simulated_seconds >= p.simulated_seconds).all()
