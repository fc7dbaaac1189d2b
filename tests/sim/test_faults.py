"""The fault model: who drops out is drawn from the seed, the scheme merges only what arrived, the ledger says why."""

import numpy as np
import pandas as pd
import pytest

from sim.core import faults
from sim.engine import run
from sim.core.scenario import build_scenario
from sim.core.types import InstitutionSpec

FLAKY = ["scenario.availability=0.7", "scenario.failure_rate=0.2"]


def spec(**kw):
    return InstitutionSpec(index=kw.pop("index", 3), name="x", discipline="d", share=1.0, **kw)


def test_draws_are_fixed_by_seed_institution_and_round():
    s = spec(availability=0.5, failure_rate=0.3)
    draws = [faults.draw(s, seed=0, round=r) for r in range(1, 200)]
    assert draws == [faults.draw(s, seed=0, round=r) for r in range(1, 200)]  # deterministic
    assert draws != [faults.draw(s, seed=1, round=r) for r in range(1, 200)]  # the seed matters
    assert draws != [faults.draw(spec(index=4, availability=0.5, failure_rate=0.3), 0, r) for r in range(1, 200)]
    # Rates: P(unavailable) = 0.5, P(failed) = 0.5 * 0.3 = 0.15; 200 draws keep both within ~4 standard errors.
    share = pd.Series(draws).value_counts(normalize=True)
    assert abs(share[faults.UNAVAILABLE] - 0.5) < 0.15 and abs(share[faults.FAILED] - 0.15) < 0.11


def test_reliable_institutions_never_drop():
    assert {faults.draw(spec(), 0, r) for r in range(1, 100)} == {faults.OK}
    assert {faults.draw(spec(availability=0.0), 0, r) for r in range(1, 100)} == {faults.UNAVAILABLE}
    assert {faults.draw(spec(failure_rate=1.0), 0, r) for r in range(1, 100)} == {faults.FAILED}


def test_scenario_defaults_apply_to_every_institution_unless_it_sets_its_own():
    rows = [{"name": "a", "share": 0.5, "availability": 0.9}, {"name": "b", "share": 0.5}]
    s = build_scenario({"institutions": rows, "availability": 0.6, "failure_rate": 0.1}, seed=0)
    assert [(i.availability, i.failure_rate) for i in s.institutions] == [(0.9, 0.1), (0.6, 0.1)]
    pop = build_scenario({"num_institutions": 4, "availability": 0.8}, seed=0)
    assert {i.availability for i in pop.institutions} == {0.8}


def test_ledger_records_who_dropped_and_why(small_cfg):
    # Execute: three rounds of FedAvg with flaky institutions
    ledger = run(small_cfg("rounds=3", *FLAKY), backend="inprocess").ledger
    inst = ledger[ledger.institution != "global"]
    # Assert: every row has a status; those that did not deliver sent nothing up
    assert set(inst.status) <= set(faults.STATUSES) and {"unavailable", "failed"} <= set(inst.status)
    assert (inst.participated == (inst.status == "ok")).all()
    dropped = inst[inst.status != "ok"]
    assert (dropped.bytes_up == 0).all() and (dropped.samples == 0).all()
    # A failed institution had already downloaded the global model; an unavailable one had not.
    assert (dropped[dropped.status == "failed"].bytes_down > 0).all()
    assert (dropped[dropped.status == "unavailable"].bytes_down == 0).all()


def test_faults_are_reproducible(small_cfg):
    a = run(small_cfg(*FLAKY), backend="inprocess")
    b = run(small_cfg(*FLAKY), backend="inprocess")
    pd.testing.assert_frame_equal(a.metrics, b.metrics)
    assert a.ledger.status.tolist() == b.ledger.status.tolist()


def test_the_scheme_merges_only_updates_that_arrived(small_cfg):
    # Prepare: one institution never shows up; the same run without it as a member
    absent = run(small_cfg("+scenario.institutions.1.availability=0.0"), backend="inprocess")
    without = run(small_cfg(), backend="inprocess", institutions=("city_hospital", "particle_lab", "astro_institute",
                                                                  "central_bank", "credit_union"))
    # Assert: the merged model is exactly the one the others build alone
    glob = lambda r: r.metrics[r.metrics.institution == "global"].reset_index(drop=True)[["round", "metric", "value"]]  # noqa: E731
    pd.testing.assert_frame_equal(glob(absent), glob(without))
    rural = absent.ledger[absent.ledger.institution == "rural_clinic"]
    assert (rural.status == "unavailable").all()


def test_faults_change_results_only_where_someone_dropped(small_cfg):
    reliable = run(small_cfg("scheme=isolated"), backend="inprocess").metrics
    flaky = run(small_cfg("scheme=isolated", *FLAKY), backend="inprocess")
    ledger = flaky.ledger
    # Isolated: an institution's scores change only once it has missed a round.
    missed = ledger[(ledger.status != "ok") & (ledger.institution != "global")]
    first_miss = missed.groupby("institution")["round"].min()
    assert len(first_miss) > 0  # these rates and this seed do drop someone
    both = reliable.merge(flaky.metrics, on=["round", "institution", "metric"], suffixes=("_r", "_f"))
    for name, rows in both[both.institution != "global"].groupby("institution"):
        before = rows["round"] < first_miss.get(name, np.inf)
        assert (rows.value_r[before] == rows.value_f[before]).all(), name


@pytest.mark.parametrize("bad, key", [
    ("scenario.availability=1.5", "scenario.availability"),
    ("scenario.failure_rate=-0.1", "scenario.failure_rate"),
    ("+scenario.institutions.0.availability=x", "scenario.institutions[0].availability"),
])
def test_fault_rates_are_probabilities(bad, key, small_cfg):
    from sim.checks import load_spec
    from sim.core.types import ConfigError

    with pytest.raises(ConfigError) as err:
        load_spec(small_cfg(bad))
    assert err.value.key == key
