"""Institutions of different architectures (scenario rows' ``model``) and the distillation schemes feddf and fedmd.

End-to-end runs use the in-process backend on digits shrunk by ``smoke=true`` (600 images), two
rounds of one local epoch and few distillation steps; each scheme's run is made once per module
and compared exactly where two runs must agree (the same seed gives bit-identical numbers).
"""

from __future__ import annotations

import pandas as pd
import pytest

from sim.checks import load_spec
from sim.cli import compose
from sim.core import data
from sim.core.data import public
from sim.core.types import ConfigError
from sim.engine import run

ROWS = 60  # public rows: 60 x 10 classes x 4 bytes = 2,400 bytes of scores per institution and round
BASE = ["data=digits", "scenario=mixed_models", "smoke=true", "rounds=2", "training.local_epochs=1",
        "engine.backend=inprocess", f"data.public={{source: heldout, rows: {ROWS}}}", "results.select=last"]
FAST = {"feddf": ["scheme.distill_steps=10"], "fedmd": ["scheme.digest_steps=5"], "isolated": []}
MIXED = ("rural_clinic", "astro_institute", "credit_union")  # the scenario's logistic-regression institutions


def config(scheme: str, *extra: str):
    """A shrunken run of ``scheme`` on the mixed scenario."""
    return compose("config", [*BASE, f"scheme={scheme}", *FAST.get(scheme, []), *extra])


@pytest.fixture(scope="module")
def runs():
    """One run per scheme (made on first use)."""
    made = {}

    def get(scheme: str):
        if scheme not in made:
            made[scheme] = run(config(scheme))
        return made[scheme]

    return get


@pytest.mark.parametrize("scheme", ["fedavg", "fedprox", "scaffold", "ditto"])
def test_weight_averaging_schemes_refuse_mixed_architectures_naming_them(scheme):
    with pytest.raises(ConfigError) as e:
        load_spec(config(scheme))
    line = str(e.value)
    assert "\n" not in line and f"scheme={scheme} averages model weights" in line
    assert all(name in line for name in MIXED) and "city_hospital" not in line


def test_distillation_needs_a_public_set_and_models_must_exist():
    with pytest.raises(ConfigError, match="^data.public: scheme=feddf distils"):
        load_spec(config("feddf", "data.public=null"))
    with pytest.raises(ConfigError, match=r"institutions\[1\].model: unknown model 'resnet'"):
        load_spec(config("isolated", "scenario.institutions.1.model=resnet"))
    with pytest.raises(ConfigError, match=r"institutions\[0\].behaviour: fedmd sends scores, not weights"):
        load_spec(config("fedmd", "+scenario.institutions.0.behaviour=sign_flip"))


def test_an_institution_naming_the_runs_own_model_is_not_heterogeneous():
    spec = load_spec(config("fedavg", "model=logreg", "scenario=default", "+scenario.institutions.1.model=logreg"))
    assert spec.models == {} and all(s.model is None for s in spec.scenario.institutions)


def test_public_rows_come_out_of_training_rows_only():
    spec = load_spec(config("isolated"))
    plain = data.build_federation({**spec.data, "public": None}, spec.scenario, 0, smoke=True)
    fed = data.build_federation(spec.data, spec.scenario, 0, smoke=True)
    assert len(fed.x_public) == ROWS and plain.x_public is None
    trained = lambda f: sum(s.num_train + len(s.y_val) for s in f.shards)  # noqa: E731
    assert trained(plain) - trained(fed) == ROWS
    pd.testing.assert_series_equal(pd.Series(plain.y_test), pd.Series(fed.y_test))  # test splits do not move


def test_feddf_keeps_one_model_per_architecture_and_books_each_its_own(runs):
    ledger = runs("feddf").ledger
    rows = ledger[(ledger.institution != "global") & ledger.participated]
    per = rows.groupby("institution").bytes_up.first()
    mlp, logreg = (64 * 64 + 64 + 64 * 10 + 10) * 4, (64 * 10 + 10) * 4  # conf/model/mlp.yaml (hidden 64), logreg
    assert {per[n] for n in MIXED} == {logreg} and set(per.drop(list(MIXED))) == {mlp}
    assert (rows.bytes_down == rows.bytes_up).all()  # its architecture's distilled model comes back
    scores = runs("feddf").metrics
    assert {"global_accuracy", "global_loss"} <= set(scores[scores.institution == "city_hospital"].metric)


def test_fedmd_sends_only_scores_on_the_public_set(runs):
    ledger = runs("fedmd").ledger
    rows = ledger[ledger.institution != "global"]
    scores = ROWS * 10 * 4  # public rows x classes x float32
    assert (rows.bytes_up == scores).all()
    assert (rows[rows["round"] == 1].bytes_down == 0).all() and (rows[rows["round"] == 2].bytes_down == scores).all()
    assert rows.participated.all() and len(rows) == 2 * 6


def test_public_labels_are_never_used(runs, monkeypatch):
    real = data.DATASETS["digits"]

    def relabelled(cfg, scenario, seed, smoke):  # every public row gets another label
        pool = real(cfg, scenario, seed, smoke)
        rows, _ = public.carve(pool.parts, ROWS, seed, scenario)
        y = pool.y.copy()
        y[rows] = (y[rows] + 1) % 10
        return pool._replace(y=y)

    monkeypatch.setitem(data.DATASETS, "digits", relabelled)
    pd.testing.assert_frame_equal(run(config("fedmd")).metrics, runs("fedmd").metrics)


def test_feddf_is_deterministic(runs):
    again = run(config("feddf"))
    pd.testing.assert_frame_equal(again.metrics, runs("feddf").metrics)
    pd.testing.assert_frame_equal(again.ledger.drop(columns=["compute_seconds"]),
                                  runs("feddf").ledger.drop(columns=["compute_seconds"]))


def test_isolated_trains_each_architecture_in_the_vectorised_step():
    one = run(config("isolated"))
    plain = run(config("isolated", "engine.vectorise=false"))
    a = one.metrics.set_index(["round", "institution", "metric"]).value
    b = plain.metrics.set_index(["round", "institution", "metric"]).value
    assert (a - b).abs().max() < 1e-4  # the vectorised step matches the plain one to float rounding


@pytest.mark.parametrize("scheme", ["fedmd", "feddf"])
def test_distillation_resumes_with_its_consensus_or_its_models(scheme, runs, tmp_path):
    # FedMD's state is its consensus scores; FedDF's, one global model per architecture
    from stopping import Stop, stop_after

    with pytest.raises(Stop):
        run(config(scheme, "checkpoint_every=1"), tmp_path / "cut", on_round=stop_after(1))
    resumed = run(compose("config", [f"resume={tmp_path / 'cut'}"]))
    pd.testing.assert_frame_equal(resumed.metrics.drop(columns="run_id"), runs(scheme).metrics.drop(columns="run_id"))


@pytest.mark.parametrize("scheme", ["feddf", "fedmd"])
def test_distillation_on_ray_hosts_gives_the_in_process_numbers(scheme, runs, ray_cluster):
    # Execute: the same run with its institutions on two Ray host actors (each with both architectures' models)
    on_ray = run(config(scheme, "engine.backend=ray", "placement=pooled", "engine.pooled_hosts=2"))
    # Assert: bit-identical metrics and the same bytes booked, whatever the placement
    keep = ["round", "institution", "metric", "value"]
    pd.testing.assert_frame_equal(on_ray.metrics[keep], runs(scheme).metrics[keep], check_exact=True)
    assert on_ray.ledger[["bytes_up", "bytes_down"]].equals(runs(scheme).ledger[["bytes_up", "bytes_down"]])


def test_the_report_shows_each_institutions_model_on_the_global_test_set_against_its_own_alone(tmp_path):
    from analysis.report import build_report

    # Prepare: isolated and feddf on the mixed scenario, written as run directories
    dirs = [tmp_path / scheme for scheme in ("isolated", "feddf")]
    for d in dirs:
        run(config(d.name), d)
    # Execute
    report = build_report(dirs, tmp_path / "report").read_text()
    gains = pd.read_csv(tmp_path / "report" / "tables" / "global_gains.csv")
    # Assert: a section, and a gain on the global test set for every institution under feddf
    assert 'id="global-gains' in report and "model on the global test set" in report
    assert sorted(gains["institution"]) == sorted(config("isolated").scenario.institutions[k].name for k in range(6))
    assert set(gains["scheme"]) == {"feddf"} and gains["gain"].notna().all()
