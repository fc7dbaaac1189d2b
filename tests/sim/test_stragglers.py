"""Stragglers: the round deadline drops late institutions or keeps their partial work, per the scheme; slowdowns
come from the seed or a trace; every path gives the same numbers and resumes to them."""

import numpy as np
import pandas as pd
import pytest

from sim.core import faults, stragglers
from sim.checks import load_spec
from sim.engine import run
from sim.core.types import ConfigError, InstitutionSpec, LocalPlan, TrainingSpec
from refusal import refused

# Transfers take ~0.10 simulated s on the default links and a full local step 0.01 to 0.07 s at
# the default scenario's cpus: 0.13 s cuts the slowed-down institutions, not the others.
SLOW = ["engine.round_deadline_s=0.13", "scenario.straggler_share=0.5", "scenario.slowdown=[2,10]"]
NAMES = ("city_hospital", "rural_clinic", "particle_lab", "astro_institute", "central_bank", "credit_union")


def institutions(ledger):
    return ledger[ledger.institution != "global"]


def values(result):
    return result.metrics[["round", "institution", "metric", "value"]].reset_index(drop=True)


def test_fedavg_drops_stragglers_as_late_and_books_their_download(small_cfg):
    # Execute: FedAvg (scheme.stragglers=drop by default) under a deadline that slowed institutions miss
    result = run(small_cfg(*SLOW), backend="inprocess")
    rows = institutions(result.ledger)
    late = rows[rows.status == faults.LATE]
    # Assert: some are late; they sent nothing, did no work that counts, but had downloaded the model
    assert len(late) > 0 and (rows.status == faults.OK).any()
    assert not late.participated.any() and (late.bytes_up == 0).all() and (late.samples == 0).all()
    assert (late.bytes_down > 0).all() and (late.work_done == 0).all()
    assert (rows[rows.status == faults.OK].work_done == 1.0).all()
    # A round with someone late lasts exactly the deadline
    per_round = result.ledger.groupby("round").sim_time.first().diff().fillna(result.ledger.sim_time.iloc[0])
    late_rounds = sorted(set(late["round"]))
    assert np.allclose(per_round[late_rounds], 0.13)


def test_fedprox_keeps_partial_work_by_the_deadline(small_cfg):
    # Execute: FedProx (scheme.stragglers=partial by default), the same deadline and slowdowns
    result = run(small_cfg("scheme=fedprox", *SLOW), backend="inprocess")
    rows = institutions(result.ledger)
    # Assert: nobody is late; the stragglers are ok with a fraction of their planned steps, at least one
    assert set(rows.status) == {faults.OK}
    partial = rows[rows.work_done < 1.0]
    assert len(partial) > 0 and (partial.work_done > 0).all()
    # Their partial work fits the deadline (one step may overrun it); the round lasts no longer than it
    assert (partial.simulated_seconds <= 0.13 + 1e-9).all()
    assert (result.ledger.groupby("round").sim_time.first().diff().dropna() <= 0.13 + 1e-9).all()
    # Less work means less device time than the same institution's full step in a round it was not slowed
    full = rows[rows.work_done == 1.0].groupby("institution").sim_compute_seconds.min()
    for _, row in partial.iterrows():
        if row.institution in full:
            assert row.sim_compute_seconds < full[row.institution] / row.work_done + 1e-12


def test_the_policy_is_the_schemes_choice(small_cfg):
    dropped = institutions(run(small_cfg("scheme=fedprox", "scheme.stragglers=drop", *SLOW), backend="inprocess").ledger)
    kept = institutions(run(small_cfg("scheme.stragglers=partial", *SLOW), backend="inprocess").ledger)
    assert (dropped.status == faults.LATE).any() and (dropped.work_done[dropped.status == "ok"] == 1).all()
    assert not (kept.status == faults.LATE).any() and (kept.work_done < 1).any()


def test_a_deadline_nobody_misses_changes_nothing(small_cfg):
    plain = run(small_cfg("scheme=fedprox"), backend="inprocess")
    roomy = run(small_cfg("scheme=fedprox", "engine.round_deadline_s=1000"), backend="inprocess")
    pd.testing.assert_frame_equal(values(plain), values(roomy))
    assert (roomy.ledger.work_done[roomy.ledger.institution != "global"] == 1).all()


def test_the_step_cap_is_the_first_steps_of_the_full_step_on_both_paths():
    # Prepare: a logistic regression on a small shard; 3 epochs of 5 batches = 15 planned steps
    from sim.core.batched import train_many
    from sim.core.models import build_model, get_state, set_state
    from sim.core.objective import Pull
    from sim.core.train import local_train

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)).astype(np.float32), rng.integers(0, 3, 50)
    training = TrainingSpec(local_epochs=3, batch_size=10, lr=0.1)
    model = build_model({"_target_": "sim.core.models.logreg"}, (6,), 3, seed=0)
    start = get_state(model)
    mu = 0.5
    # Execute: the capped step, one at a time and vectorised (next to an uncapped institution)
    set_state(model, start)
    _, steps = local_train(model, x, y, training=training, key=(0, 1, 2), max_steps=4, terms=(Pull(mu),))
    one = get_state(model)
    many = train_many(model, [start, start], [(x, y), (x, y)], [(0, 1, 2), (0, 1, 2)], training=training, mu=mu,
                      max_steps=[4, None])
    # Assert: four steps taken; both paths agree to float32 rounding; the uncapped one trained all 15
    assert steps == 4 and many[0][2] == 4 and many[1][2] == stragglers.planned_steps(50, training) == 15
    for k in one:
        np.testing.assert_allclose(many[0][0][k], one[k], rtol=1e-5, atol=1e-6)
    assert stragglers.processed(4, 50, training) == 40 and stragglers.processed(7, 50, training) == 70
    assert stragglers.seen(4, 50, training) == 40 and stragglers.seen(7, 50, training) == 50


def test_vectorised_and_one_at_a_time_paths_agree_with_partial_work(small_cfg):
    batched = run(small_cfg("scheme=fedprox", *SLOW), backend="inprocess")
    single = run(small_cfg("scheme=fedprox", *SLOW, "engine.vectorise=false"), backend="inprocess")
    # Same stragglers, same caps, so the same ledger; the weights agree to float32 rounding (sim/core/batched.py)
    cols = ["round", "institution", "status", "samples", "work_done", "simulated_seconds"]
    pd.testing.assert_frame_equal(batched.ledger[cols], single.ledger[cols])
    np.testing.assert_allclose(values(batched).value, values(single).value, rtol=1e-4, atol=1e-5)


def test_ray_placement_gives_the_inprocess_numbers_with_stragglers(small_cfg, ray_cluster):
    pooled = run(small_cfg("scheme=fedprox", *SLOW, "placement=pooled", "engine.pooled_hosts=2"))
    inprocess = run(small_cfg("scheme=fedprox", *SLOW), backend="inprocess")
    pd.testing.assert_frame_equal(values(pooled), values(inprocess))
    assert pooled.ledger.work_done.tolist() == inprocess.ledger.work_done.tolist()


def test_the_round_the_last_merge_began_is_taken_only_at_the_engines_clock(small_cfg, ray_cluster, monkeypatch):
    # Prepare: on Ray the coordinator begins round r+1 as it merges round r, at the simulated time it expects the
    # engine's clock to reach (the deadline moves the clock unevenly here), and the hosts are asked to train it at
    # once. After each round, ask the backend for the next round at another time, then at that one.
    from sim import engine

    started, seen = [], []
    real = engine._start_backend

    def keep(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    def probe(r, summary):
        runner = started[-1]
        if runner.ahead is None:
            return
        ahead, training = runner.ahead, runner.training_ahead
        ctx, began = ahead[1]
        try:
            runner.begin_round(r + 1, began + 1.0)
            refused = False
        except RuntimeError as e:
            refused = "already train" in str(e)
        runner.ahead = ahead
        taken = runner.begin_round(r + 1, began)
        seen.append((ctx.round, refused, taken is ctx and runner.state_ref is ahead[2],
                     runner.training_ahead is training and training[0] is ctx))
        runner.ahead = ahead  # the engine begins it next, as it would have

    monkeypatch.setattr(engine, "_start_backend", keep)
    overrides = ("scheme=fedprox", *SLOW, "rounds=4")
    # Execute
    result = run(small_cfg(*overrides, "placement=pooled", "engine.pooled_hosts=2"), on_round=probe)
    # Assert: every round after the first was begun ahead and its training asked for; another time was refused (its
    # hosts train it already), the same one took it; the run has the in-process numbers and clock
    assert seen == [(r, True, True, True) for r in range(2, int(result.metrics["round"].max()) + 1)] and len(seen) >= 2
    inprocess = run(small_cfg(*overrides), backend="inprocess")
    pd.testing.assert_frame_equal(values(result), values(inprocess))
    assert result.ledger.sim_time.tolist() == inprocess.ledger.sim_time.tolist()


def test_resume_reproduces_a_run_with_stragglers(tmp_path):
    from stopping import resume_matches_straight

    ref = resume_matches_straight(["scheme=fedprox", *SLOW], tmp_path)
    assert (ref.ledger.work_done < 1).any()


def test_slowdowns_are_drawn_per_seed_institution_and_round():
    spec = stragglers.StragglerSpec(share=0.9, slowdown=(2.0, 4.0))
    a = InstitutionSpec(index=0, name="a", discipline="d", share=0.5)
    draws = [spec.factor(a, 0, r)[0] for r in range(1, 301)]
    assert draws == [spec.factor(a, 0, r)[0] for r in range(1, 301)]
    assert draws != [spec.factor(a, 1, r)[0] for r in range(1, 301)]
    slowed = [f for f in draws if f != 1.0]
    # 300 draws with p = 0.9: the share within ~4 standard errors (0.017 each); factors within 1/4 .. 1/2
    assert abs(len(slowed) / 300 - 0.9) < 0.07 and all(0.25 <= f <= 0.5 for f in slowed)


def trace_file(tmp_path, rows, header="institution,round,speed,available"):
    path = tmp_path / "trace.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def test_a_trace_sets_speeds_and_availability_and_loops(tmp_path, small_cfg):
    # Prepare: rural_clinic offline in round 1 and twenty times slower in round 2; the trace has two rounds
    rows = [f"{n},1,1.0,1" for n in NAMES if n != "rural_clinic"] + ["rural_clinic,1,1.0,0", "rural_clinic,2,0.05,1"]
    path = trace_file(tmp_path, rows)
    # Execute: four rounds, so rounds 3 and 4 read the trace's rounds 1 and 2 again
    result = run(small_cfg("rounds=4", "smoke=false", f"scenario.speed_trace={path}", "engine.round_deadline_s=0.13"),
                 backend="inprocess")
    rural = result.ledger[result.ledger.institution == "rural_clinic"].set_index("round").status
    assert rural.tolist() == [faults.UNAVAILABLE, faults.LATE, faults.UNAVAILABLE, faults.LATE]
    others = institutions(result.ledger)
    assert set(others[others.institution != "rural_clinic"].status) == {faults.OK}


@pytest.mark.parametrize("rows, header, problem", [
    ([f"{n},1,1.0" for n in NAMES[1:]], "institution,round,speed", "no rows for 1 institution(s): 'city_hospital'"),
    ([f"{n},1,{-0.5 if i == 2 else 1.0}" for i, n in enumerate(NAMES)], "institution,round,speed", "must be a number > 0"),
    ([f"{n},1,{0 if i == 2 else 1.0}" for i, n in enumerate(NAMES)], "institution,round,speed", "must be a number > 0"),
    ([f"{n},1,x" for n in NAMES], "institution,round,speed", "must be a number > 0"),
    ([f"{n},0,1.0" for n in NAMES], "institution,round,speed", "it must be a whole number >= 1"),
    ([f"{n},1,2" for n in NAMES], "institution,round,available", "must be 0 or 1"),
    ([f"{n},1" for n in NAMES], "institution,round", "needs institution, round and speed and/or available"),
    ([*(f"{n},1,1.0" for n in NAMES), "nobody,1,1.0"], "institution,round,speed", "does not have"),
])
def test_a_bad_trace_is_one_line_before_anything_runs(rows, header, problem, tmp_path, capsys):
    path = trace_file(tmp_path, rows, header)
    err = refused([f"scenario.speed_trace={path}"], capsys)
    assert err.startswith("error: scenario.speed_trace: ") and problem in err


def test_a_bad_trace_names_every_offending_row_with_plain_values(tmp_path, capsys):
    # Prepare: a numeric speed column (numpy values) wrong in five rows
    rows = [f"{n},1,{-2 if i < 5 else 1}" for i, n in enumerate(NAMES)]
    path = trace_file(tmp_path, rows, "institution,round,speed")
    # Execute
    err = refused([f"scenario.speed_trace={path}"], capsys)
    # Assert: the count, the first four with their values as written, how many more; never a numpy repr
    assert f"{path}: speed is wrong in 5 row(s): row 2 (-2 of '{NAMES[0]}'), row 3 (-2 of '{NAMES[1]}')" in err
    assert "and 1 more; it must be a number > 0" in err and "np." not in err


@pytest.mark.parametrize("override, key", [
    ("engine.round_deadline_s=0", "engine.round_deadline_s"),
    ("engine.round_deadline_s=-2.5", "engine.round_deadline_s"),
    ("scenario.speed_trace=/no/such/trace.csv", "scenario.speed_trace"),
    ("scenario.slowdown=[5,2]", "scenario.slowdown"),
    ("scenario.slowdown=[0.5,2]", "scenario.slowdown"),
    ("scenario.straggler_share=1.5", "scenario.straggler_share"),
    ("scheme.stragglers=wait", "scheme.stragglers"),
])
def test_bad_straggler_settings_are_refused_naming_the_key(override, key, capsys):
    err = refused([override], capsys)
    assert err.startswith(f"error: {key}: ")


def test_a_trace_and_drawn_slowdowns_are_not_mixed(tmp_path, small_cfg):
    path = trace_file(tmp_path, [f"{n},1,1.0,1" for n in NAMES])
    with pytest.raises(ConfigError) as err:
        load_spec(small_cfg(f"scenario.speed_trace={path}", "scenario.straggler_share=0.5"))
    assert err.value.key == "scenario.speed_trace"
