"""compute_share: the broker on hand-made specs, the ledger booking, FedAvg's numbers, determinism, resume, bad input.

Times in the broker are relative (data share over cores' worth of compute), so the expected
plans below are worked out by hand. Seconds in the ledger are compared with 1e-12 relative
tolerance: float64 round-off of a handful of additions and one rescaling by a rate ratio.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agents.schemes import broker
from agents.schemes.compute_share import ComputeShare, handover_seconds
from sim.core import clock
from sim.cli import compose
from sim.checks import load_spec
from sim.engine import run
from sim.core.types import ConfigError, InstitutionSpec, RoundContext
from stopping import resume_matches_straight
from refusal import refused

F64 = 1e-12
SMALL = ["smoke=true", "rounds=2", "data.num_samples=600"]
LEDGER_NUMBERS = ["bytes_up", "bytes_down", "samples", "simulated_seconds", "sim_compute_seconds", "sim_time",
                  "data_bytes", "compute_given_seconds", "compute_taken_seconds", "solo_seconds"]


def spec(i: int, share: float, cpus: float, **kw) -> InstitutionSpec:
    return InstitutionSpec(index=i, name="ABCDE"[i], discipline="x", share=share, cpus=cpus, **kw)


# A: 0.4/2 = 0.2   B: 0.2/1.5 = 0.133   C: 0.2/0.1 = 2.0   D: 0.2/0.2 = 1.0   (median 0.6, x1.25 = 0.75)
SPECS = (spec(0, 0.4, 2.0), spec(1, 0.2, 1.5), spec(2, 0.2, 0.1), spec(3, 0.2, 0.2))


# --- the broker --------------------------------------------------------------------


def test_broker_serves_the_slowest_first_on_the_giver_that_finishes_it_earliest() -> None:
    # Execute
    p = broker.plan(SPECS, slow_factor=1.25)
    # Assert: C first: A finishes it at 0.2 + 0.2/2 = 0.3, B at 0.133 + 0.133 = 0.267 -> B.
    #         then D: A at 0.2 + 0.1 = 0.3, B at 0.267 + 0.133 = 0.4 -> A.
    assert p.takers == ("C", "D")
    assert dict(p.partner) == {"C": "B", "D": "A"}
    assert p.reference == pytest.approx(0.6, rel=F64)
    assert p.finish["B"] == pytest.approx(0.2 / 1.5 * 2, rel=F64) and p.finish["A"] == pytest.approx(0.3, rel=F64)
    assert p.makespan_alone == pytest.approx(2.0, rel=F64) and p.makespan_shared == pytest.approx(0.3, rel=F64)


def test_broker_leaves_home_a_taker_nobody_can_finish_sooner() -> None:
    # Prepare: A 0.2, B 0.6, C 0.6, D 0.1 (the fastest), E 3.0; against the fastest everyone else is a taker
    specs = (spec(0, 0.1, 0.5), spec(1, 0.3, 0.5), spec(2, 0.3, 0.5), spec(3, 0.05, 0.5), spec(4, 0.3, 0.1))
    # Execute
    p = broker.plan(specs, slow_factor=1.0, reference="fastest")
    # Assert: D finishes E's data at 0.1 + 0.6 = 0.7 < 3.0; then B and C (0.7 + 0.6 > 0.6) and A (0.9 > 0.2) stay home
    assert p.takers == ("E", "B", "C", "A")
    assert dict(p.partner) == {"E": "D"} and p.finish["D"] == pytest.approx(0.7, rel=F64)
    assert p.makespan_shared == pytest.approx(0.7, rel=F64)


def test_speed_factor_counts_like_cores() -> None:
    # A tenth of the speed is a tenth of the cores: the same plan either way
    slow_by_speed = (*SPECS[:2], spec(2, 0.2, 1.0, speed=0.1), SPECS[3])
    assert dict(broker.plan(slow_by_speed, 1.25).partner) == dict(broker.plan(SPECS, 1.25).partner)


def test_nobody_slow_enough_names_slow_factor() -> None:
    with pytest.raises(ConfigError) as e:
        broker.check(SPECS, slow_factor=5.0)
    assert e.value.key == "scheme.slow_factor" and "C" in e.value.problem


def test_no_spare_capacity_is_refused() -> None:
    # Everyone equally fast except one slightly slower one: no giver finishes it sooner than it does at home
    specs = (spec(0, 0.3, 1.0), spec(1, 0.3, 1.0), spec(2, 0.4, 1.0))
    with pytest.raises(ConfigError) as e:
        broker.check(specs, slow_factor=1.0)
    assert e.value.key == "scenario.institutions" and "no institution that has spare capacity" in e.value.problem


# --- the ledger booking ------------------------------------------------------------


def row(s: InstitutionSpec, status: str = "ok", samples: int = 100, up: int = 1000) -> dict:
    """A ledger row as the coordinator books an arrived update (or an absent one), compute at the spec's rate."""
    arrived = status == "ok"
    compute = clock.compute_seconds(s, 5 * samples, 10**6) if arrived else 0.0
    moved = clock.transfer_seconds(s, up, up) if arrived else 0.0
    return {"institution": s.name, "participated": arrived, "status": status, "samples": samples if arrived else 0,
            "sim_compute_seconds": compute, "simulated_seconds": compute + moved, "bytes_up": up, "bytes_down": up}


def scheme() -> ComputeShare:
    s = ComputeShare()
    s.attach(SPECS, row_bytes=10)
    return s


def test_book_moves_the_takers_training_to_its_giver() -> None:
    # Prepare
    s, rows = scheme(), [row(x) for x in SPECS]
    before = {r["institution"]: dict(r) for r in rows}
    # Execute
    s.book(RoundContext(round=1, seed=0, cohort=tuple("ABCD")), rows)
    a, b, c, d = rows
    # Assert: C's 0.1-core training runs on B's 1.5 cores, D's on A's 2
    taken_c = before["C"]["sim_compute_seconds"] * 0.1 / 1.5
    assert c["trained_by"] == "B" and c["compute_taken_seconds"] == pytest.approx(taken_c, rel=F64)
    assert c["sim_compute_seconds"] == 0.0 and c["data_bytes"] == 100 * 10
    assert b["compute_given_seconds"] == pytest.approx(taken_c, rel=F64)
    assert b["sim_compute_seconds"] == pytest.approx(before["B"]["sim_compute_seconds"] + taken_c, rel=F64)
    arriving = handover_seconds(SPECS[2], SPECS[1], 1000)
    assert b["simulated_seconds"] == pytest.approx(before["B"]["simulated_seconds"] + arriving + taken_c, rel=F64)
    finish_b = arriving + before["B"]["sim_compute_seconds"] + taken_c
    transfer_c = before["C"]["simulated_seconds"] - before["C"]["sim_compute_seconds"]
    assert c["simulated_seconds"] == pytest.approx(finish_b + transfer_c, rel=F64)
    # solo_seconds keeps the time each would have taken without sharing
    assert c["solo_seconds"] == before["C"]["simulated_seconds"]
    assert b["solo_seconds"] == before["B"]["simulated_seconds"]
    assert d["trained_by"] == "A" and a["compute_given_seconds"] == pytest.approx(d["compute_taken_seconds"], rel=F64)
    assert "trained_by" not in a and c["bytes_up"] == 1000  # the model exchange stays on the taker's row


def test_data_moves_once_and_an_offline_giver_leaves_its_taker_at_home() -> None:
    # Prepare
    s = scheme()
    s.book(RoundContext(round=1, seed=0, cohort=tuple("ABCD")), [row(x) for x in SPECS])
    rows = [row(SPECS[0], status="unavailable"), *(row(x) for x in SPECS[1:])]
    # Execute: round 2, A is offline
    s.book(RoundContext(round=2, seed=0, cohort=tuple("BCD")), rows)
    # Assert: C's data is at B already: no bytes, no handover time; D trains at home, untouched
    c, d = rows[2], rows[3]
    assert c["data_bytes"] == 0 and c["trained_by"] == "B"
    assert rows[1]["simulated_seconds"] == pytest.approx(rows[1]["solo_seconds"] + c["compute_taken_seconds"], rel=F64)
    assert "trained_by" not in d and d == row(SPECS[3])
    assert max(r["simulated_seconds"] for r in rows) < max(r.get("solo_seconds", r["simulated_seconds"]) for r in rows)
    # ... and the state carries it: a restored scheme books no second move
    restored = scheme()
    restored.load_state(s.state())
    assert restored.moved == {2, 3}  # C and D moved in round 1


# --- end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    """compute_share and fedavg on the default scenario, same seed, in process."""
    return tuple(run(compose("config", SMALL + [f"scheme={name}"]), backend="inprocess")
                 for name in ("compute_share", "fedavg"))


def test_metrics_equal_fedavgs_and_the_ledger_books_the_sharing(pair) -> None:
    shared, fedavg = pair
    # Assert: the numbers of training are FedAvg's, to the bit
    pd.testing.assert_frame_equal(shared.metrics.drop(columns=["run_id", "scheme"]),
                                  fedavg.metrics.drop(columns=["run_id", "scheme"]))
    lg, ref = (x.ledger.set_index(["round", "institution"]) for x in pair)
    # The default scenario's plan: astro_institute (0.1 of 0.1 core) trains on city_hospital (0.5 core)
    astro, city = lg.loc[(1, "astro_institute")], lg.loc[(1, "city_hospital")]
    assert astro["trained_by"] == "city_hospital" and astro["sim_compute_seconds"] == 0.0
    assert astro["compute_taken_seconds"] == pytest.approx(ref.loc[(1, "astro_institute"), "sim_compute_seconds"] * 0.2,
                                                           rel=F64)
    assert city["compute_given_seconds"] == pytest.approx(astro["compute_taken_seconds"], rel=F64)
    assert astro["data_bytes"] > 0 and lg.loc[(2, "astro_institute"), "data_bytes"] == 0
    assert (lg["bytes_up"] == ref["bytes_up"]).all() and (lg["bytes_down"] == ref["bytes_down"]).all()
    assert (lg["solo_seconds"] == ref["simulated_seconds"]).all()  # without sharing: fedavg's clock exactly
    assert lg.loc[(1, "city_hospital"), "simulated_seconds"] > ref.loc[(1, "city_hospital"), "simulated_seconds"]
    others = lg.drop(index=["astro_institute", "city_hospital"], level="institution")
    assert (others["trained_by"] == others.index.get_level_values("institution")).all()
    assert (others["simulated_seconds"] == ref.drop(index=["astro_institute", "city_hospital"],
                                                    level="institution")["simulated_seconds"]).all()
    # fedavg's own rows: trained at home, nothing moved, solo = simulated
    assert (ref["data_bytes"] == 0).all() and (ref["compute_given_seconds"] == 0).all()
    assert (ref["trained_by"] == ref.index.get_level_values("institution")).all()


def test_data_bytes_are_the_raw_rows_pooled_would_upload(pair) -> None:
    pooled = run(compose("config", SMALL + ["scheme=pooled"]), backend="inprocess")
    up = pooled.ledger.set_index(["round", "institution"]).loc[(1, "astro_institute"), "bytes_up"]
    assert pair[0].ledger.set_index(["round", "institution"]).loc[(1, "astro_institute"), "data_bytes"] == up


def test_same_seed_same_ledger_and_metrics(pair) -> None:
    again = run(compose("config", SMALL + ["scheme=compute_share"]), backend="inprocess")
    pd.testing.assert_frame_equal(again.metrics, pair[0].metrics)
    kept = LEDGER_NUMBERS + ["trained_by"]  # all but the measured wall time, which varies run to run
    pd.testing.assert_frame_equal(again.ledger[kept], pair[0].ledger[kept])


def test_ray_hosts_book_what_the_in_process_run_books(pair, ray_cluster) -> None:
    # Two host actors, three institutions each: the same metrics and ledger as in process
    ray = run(compose("config", SMALL + ["scheme=compute_share", "placement=pooled", "engine.pooled_hosts=2"]))
    pd.testing.assert_frame_equal(ray.metrics.drop(columns="run_id"), pair[0].metrics.drop(columns="run_id"))
    kept = LEDGER_NUMBERS + ["trained_by"]  # run_id differs: the placement is part of the config
    pd.testing.assert_frame_equal(ray.ledger[kept], pair[0].ledger[kept])


def test_a_coalition_without_a_slow_member_shares_nothing() -> None:
    # astro_institute (1.0) and city_hospital (0.68): median 0.84, nobody above 1.25 x 0.84; the pre-run check saw all six
    result = run(compose("config", SMALL + ["scheme=compute_share"]), backend="inprocess",
                 institutions=("city_hospital", "astro_institute"))
    lg = result.ledger[result.ledger["institution"] != "global"]
    assert (lg["trained_by"] == lg["institution"]).all() and (lg["data_bytes"] == 0).all()
    assert (lg["solo_seconds"] == lg["simulated_seconds"]).all()


def test_a_resumed_run_matches_and_moves_the_data_once(tmp_path) -> None:
    ref = resume_matches_straight(["scheme=compute_share"], tmp_path)
    resumed = pd.read_parquet(tmp_path / "cut" / "ledger.parquet")
    assert resumed["data_bytes"].sum() == ref.ledger["data_bytes"].sum() > 0
    np.testing.assert_allclose(resumed[LEDGER_NUMBERS].to_numpy(float), ref.ledger[LEDGER_NUMBERS].to_numpy(float),
                               rtol=F64)


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["scheme.slow_factor=10"], "scheme.slow_factor"),
    (["scheme.reference=fastest", "scheme.slow_factor=1"], "scenario.institutions"),
    (["scheme.slow_factor=0.5"], "scheme.slow_factor"),
    (["scheme.reference=slowest"], "scheme.reference"),
])
def test_bad_input_is_one_line_naming_the_key(overrides, key, capsys) -> None:
    err = refused(["scheme=compute_share", *overrides], capsys)
    assert f"{key}:" in err


def test_the_default_scenario_passes_the_pre_run_check() -> None:
    # particle_lab and astro_institute take 1.0 / 0.74 = 1.35x the median: takers under the default slow_factor 1.25
    spec = load_spec(compose("config", ["scheme=compute_share"]))
    assert broker.check(spec.scenario.institutions, 1.25).takers == ("particle_lab", "astro_institute")
