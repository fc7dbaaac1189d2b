"""Personalising schemes (fedper, finetune, ditto, reptile): what they share, keep, adapt and score.

Unit tests drive one :class:`~agents.institution.Institution` with a tiny MLP; end-to-end
tests run the in-process backend on shrunken configs (``small_cfg``). Where two runs
must agree they are compared exactly: the same seed gives bit-identical numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agents.institution import Institution
from agents.schemes.fedper import personal_keys
from agents.schemes.finetune import AdaptClient
from agents.schemes.ditto import Ditto
from agents.schemes.fedper import FedPer
from agents.schemes.finetune import FineTune
from agents.schemes.reptile import Reptile
from sim.cli import compose
from sim.checks import load_spec
from sim.engine import run
from sim.core.models import build_model, get_state
from sim.core.types import ConfigError, InstitutionSpec, LocalPlan, RoundContext, Shard, TrainingSpec, Update, state_nbytes

PERSONAL = ("fedper", "finetune", "ditto", "reptile")
MLP = {"_target_": "sim.core.models.mlp", "hidden": [8]}  # Flatten, Linear(6->8), ReLU, Linear(8->3): head keys "3.*"
HEAD = ("3.weight", "3.bias")
TRAINING = TrainingSpec(local_epochs=2, batch_size=8, lr=0.05)


def shard(seed: int = 0, n: int = 48) -> Shard:
    """A small 3-class shard whose labels follow a fixed linear rule of 6 features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 24, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 3))).argmax(1).astype(np.int64)
    return Shard("inst0", x[:n], y[:n], x[n:], y[n:])


def institution(initial: dict) -> Institution:
    """Institution 0 of seed 0 holding :func:`shard`, starting from ``initial``."""
    spec = InstitutionSpec(index=0, name="inst0", discipline="d", share=1.0)
    return Institution(spec, shard(), training=TRAINING, seed=0, initial=initial)


@pytest.fixture
def model():
    """The working model a host would lend."""
    return build_model(MLP, (6,), 3, seed=0)


def ctx(plan: LocalPlan, round: int = 1) -> RoundContext:
    """Round ``round`` with institution 0 in the cohort."""
    return RoundContext(round=round, seed=0, cohort=("inst0",), plan=plan)


def copy(state) -> dict:
    """A deep copy of a state, to check later that nothing moved it."""
    return {k: np.array(v, copy=True) for k, v in state.items()}


def assert_same(a, b) -> None:
    """Two states hold identical keys and arrays."""
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


class Stop(Exception):
    """Stands for the driver going away after a round."""


def values(result) -> pd.DataFrame:
    """The metrics table without run-identifying columns."""
    return result.metrics.drop(columns=["run_id"]).reset_index(drop=True)


# --- which keys stay home --------------------------------------------------------------------


def test_auto_personal_keys_are_the_last_layer_of_small_nets() -> None:
    # Prepare: an MLP, a CNN and a logistic regression
    auto = "auto"
    nets = {
        "mlp": build_model(MLP, (6,), 3, seed=0),
        "cnn": build_model({"_target_": "sim.core.models.cnn", "channels": [2], "hidden": 4}, (1, 4, 4), 3, seed=0),
        "logreg": build_model({"_target_": "sim.core.models.logreg"}, (6,), 3, seed=0),
    }
    # Execute
    kept = {name: personal_keys(auto, get_state(net)) for name, net in nets.items()}
    # Assert: the output Linear; for logreg that is the whole model
    assert kept["mlp"] == HEAD
    assert kept["cnn"] == ("6.weight", "6.bias")
    assert kept["logreg"] == ("1.weight", "1.bias")


def test_auto_personal_keys_keep_a_whole_transformer_classifier_and_not_the_adapters() -> None:
    # Prepare: key names of a peft-wrapped sequence classifier (adapters, then a two-layer head)
    names = ["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight",
             "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight",
             "base_model.model.classifier.dense.weight", "base_model.model.classifier.dense.bias",
             "base_model.model.classifier.out_proj.weight", "base_model.model.classifier.out_proj.bias"]
    state = {k: np.zeros(2, np.float32) for k in names}
    # Execute
    kept = personal_keys("auto", state)
    # Assert
    assert kept == tuple(names[2:])


def test_explicit_prefixes_pick_keys_and_a_prefix_matching_nothing_names_its_key(model) -> None:
    state = get_state(model)
    assert personal_keys(("1.",), state) == ("1.weight", "1.bias")
    assert personal_keys((), state) == ()
    with pytest.raises(ConfigError, match=r"^scheme\.personal_keys: \['head'\] match no key"):
        personal_keys(("head",), state)


# --- fedper ------------------------------------------------------------------------------------


def test_fedper_uploads_the_body_keeps_its_head_and_scores_global_body_with_own_head(model) -> None:
    # Prepare
    initial = get_state(model)
    inst, plan = institution(copy(initial)), FedPer().plan(1)
    glob = copy(initial)
    # Execute
    update = inst.train(model, ctx(plan), glob)
    # Assert: only the body crosses (both ways) and the head stays with the institution, trained
    assert set(update.state) == set(initial) - set(HEAD)
    body = {k: v for k, v in initial.items() if k not in HEAD}
    assert update.bytes_up == state_nbytes(body) and update.bytes_down == state_nbytes(body)
    assert set(inst.persistent()) == {"uploaded_data", *(f"personal/{k}" for k in HEAD)}
    assert not np.allclose(inst.personal["3.weight"], initial["3.weight"])
    assert_same(glob, initial)  # training never writes into the global state it was given
    # Assert: scoring uses the global body and the institution's head
    new_body = {k: v + 0.5 for k, v in body.items()}
    scores = inst.evaluate(model, plan, {**initial, **new_body}, (shard().x_test, shard().y_test))
    assert_same(get_state(model), {**initial, **new_body, **inst.personal})
    assert "global_accuracy" in scores  # the merged model has no trained head: the global row averages personal models


def test_fedper_merge_leaves_the_head_at_its_initial_value(model) -> None:
    # Prepare: two bodies arrive; the global state holds the initial head
    initial = get_state(model)
    ups = [Update(f"inst{i}", i, {k: v + i for k, v in initial.items() if k not in HEAD}, 10, 0.0, 0.0, 0)
           for i in (1, 3)]
    # Execute
    merged = FedPer().merge(RoundContext(round=1, seed=0, cohort=("inst1", "inst3")), initial, ups)
    # Assert: the body is the mean (+2), the head untouched
    np.testing.assert_allclose(merged["1.weight"], initial["1.weight"] + 2, rtol=1e-6)
    for k in HEAD:
        np.testing.assert_array_equal(merged[k], initial[k])


def test_fedper_ledger_counts_only_the_shared_keys(small_cfg) -> None:
    # Prepare: the default MLP (60 -> 64 -> 10); its head is the last Linear
    head = 64 * 10 * 4 + 10 * 4
    full = (60 * 64 + 64 + 64 * 10 + 10) * 4
    # Execute
    ledger = run(small_cfg("scheme=fedper", "model=mlp"), backend="inprocess").ledger
    # Assert
    sent = ledger[ledger.participated & (ledger.institution != "global")]
    assert len(sent) > 0
    assert (sent.bytes_up == full - head).all() and (sent.bytes_down == full - head).all()


# --- finetune and reptile: adapt a copy before scoring --------------------------------------


@pytest.mark.parametrize("plan", [FineTune().plan(3), Reptile(adapt_steps=5).plan(3), FineTune(finetune_epochs=1).plan(3)])
def test_adaptation_changes_the_score_but_nothing_carried_and_is_deterministic(plan, model) -> None:
    # Prepare
    glob = get_state(model)
    kept = copy(glob)
    inst = institution(copy(glob))
    plain = inst.evaluate(model, LocalPlan(), glob, None)
    # Execute: score twice
    first = inst.evaluate(model, plan, glob, None)
    second = inst.evaluate(model, plan, glob, None)
    # Assert: a better fit of its own data, the same numbers twice, global and carried state untouched
    assert first["loss"] < plain["loss"]
    assert first == second
    assert_same(glob, kept)
    assert inst.persistent() == {} and "global_accuracy" not in first


def test_adaptation_takes_exactly_adapt_steps_minibatches(model, monkeypatch) -> None:
    # Prepare: record what adaptation hands to local_train
    import agents.schemes.finetune as module  # the client half of finetune and reptile adapts

    seen = []
    monkeypatch.setattr(module, "local_train", lambda m, x, y, *, training, key, terms=():
                        seen.append((len(y), training.batch_size, training.local_epochs, key)) or (0.0, 0))
    inst = institution(get_state(model))
    # Execute
    inst.evaluate(model, LocalPlan(client=AdaptClient(steps=7, round=4)), get_state(model), None)
    inst.evaluate(model, LocalPlan(client=AdaptClient(epochs=2, round=4)), get_state(model), None)
    # Assert: 7 batches of 8 over one pass, then two epochs of the whole shard; keyed by round 4, own stream
    assert seen[0][:3] == (7 * 8, 8, 1)
    assert seen[1][:3] == (48, 8, 2)
    assert seen[0][3] == (0, 0, 4, module.ADAPT_STREAM)


def test_finetune_keeps_fedavgs_global_model_and_ledger_but_scores_institutions_differently(small_cfg) -> None:
    # Execute
    fedavg = run(small_cfg("scheme=fedavg"), backend="inprocess")
    tuned = run(small_cfg("scheme=finetune"), backend="inprocess")
    # Assert: scoring never touches what is merged or sent; institutions' scores move
    glob = lambda r: values(r)[values(r).institution == "global"].drop(columns="scheme")  # noqa: E731
    pd.testing.assert_frame_equal(glob(fedavg), glob(tuned))
    cols = ["institution", "bytes_up", "bytes_down"]
    pd.testing.assert_frame_equal(fedavg.ledger[cols], tuned.ledger[cols])
    own = lambda r: values(r)[values(r).institution != "global"].value.to_numpy()  # noqa: E731
    assert not np.array_equal(own(fedavg), own(tuned))


def test_reptile_with_full_server_step_and_no_adaptation_is_fedavg(small_cfg) -> None:
    fedavg = run(small_cfg("scheme=fedavg"), backend="inprocess")
    same = run(small_cfg("scheme=reptile", "scheme.server_lr=1.0", "scheme.adapt_steps=0"), backend="inprocess")
    meta = run(small_cfg("scheme=reptile"), backend="inprocess")
    pd.testing.assert_frame_equal(values(fedavg).drop(columns="scheme"), values(same).drop(columns="scheme"))
    glob = lambda r: values(r).query("institution == 'global' and round == 2").value.to_numpy()  # noqa: E731
    assert not np.array_equal(glob(fedavg), glob(meta))  # server_lr 0.5 moves the meta-model only half way


# --- ditto --------------------------------------------------------------------------------------


def test_ditto_personal_model_differs_from_global_and_a_large_lam_holds_it_there(model) -> None:
    # Prepare
    glob = get_state(model)

    def distance(lam: float) -> float:
        inst = institution(copy(glob))
        update = inst.train(model, ctx(Ditto(lam=lam).plan(1)), glob)
        assert set(update.state) == set(glob)  # the global model's update crosses as under FedAvg
        return float(np.sqrt(sum(((inst.personal[k] - glob[k]) ** 2).sum() for k in glob)))

    # Execute: lam * lr up to 0.95, just under the 1.0 where one step lands on the anchor
    free, pulled, held = distance(0.0), distance(2.0), distance(19.0)
    # Assert: the gap shrinks with lam (at rest v - w = -grad/lam); 12 steps at lam 19 leave ~1/8 of it
    assert free > 0.1
    assert free > pulled > held
    assert held < 0.2 * free


def test_ditto_scores_personal_models_but_its_global_model_is_fedavgs(small_cfg) -> None:
    fedavg = run(small_cfg("scheme=fedavg"), backend="inprocess")
    ditto = run(small_cfg("scheme=ditto", "scheme.lam=0.5"), backend="inprocess")
    glob = lambda r: values(r)[values(r).institution == "global"].drop(columns="scheme")  # noqa: E731
    pd.testing.assert_frame_equal(glob(fedavg), glob(ditto))  # personal training draws from its own stream
    after = lambda r: values(r).query("institution != 'global' and round == 2").value.to_numpy()  # noqa: E731
    assert not np.array_equal(after(fedavg), after(ditto))
    # The personal model's training is booked: twice FedAvg's local samples, so more simulated compute.
    busy = lambda r: r.ledger[r.ledger.participated & (r.ledger.institution != "global")]  # noqa: E731
    assert (busy(ditto).simulated_seconds.to_numpy() > busy(fedavg).simulated_seconds.to_numpy()).all()


def test_ditto_refuses_a_pull_that_diverges(model) -> None:
    inst = institution(get_state(model))
    with pytest.raises(ConfigError, match=r"^scheme\.lam: "):
        inst.train(model, ctx(Ditto(lam=40.0).plan(1)), get_state(model))  # 40 * 0.05 = 2


# --- every scheme: end to end, determinism, persistence ----------------------------------------


@pytest.mark.parametrize("scheme", PERSONAL)
def test_each_scheme_runs_end_to_end_with_identical_numbers_twice(scheme, small_cfg) -> None:
    # Execute
    a = run(small_cfg(f"scheme={scheme}", "model=logreg"), backend="inprocess")
    b = run(small_cfg(f"scheme={scheme}", "model=logreg"), backend="inprocess")
    # Assert: every institution and the global row scored each round, finite, bit-identical across runs
    acc = a.metrics[a.metrics.metric == "accuracy"]
    assert set(acc["round"]) == {0, 1, 2} and acc.value.between(0, 1).all()
    assert acc.institution.nunique() == 7
    pd.testing.assert_frame_equal(a.metrics, b.metrics)


@pytest.mark.parametrize("plan", [FedPer().plan(1), Ditto(lam=0.5).plan(1)])
def test_personal_state_round_trips_through_persistent_and_restore(plan, model) -> None:
    # Prepare: one round of training, then a fresh institution (a restarted host) restored from it
    glob = get_state(model)
    trained = institution(copy(glob))
    trained.train(model, ctx(plan), glob)
    saved = trained.persistent()
    fresh = institution(copy(glob))
    # Execute
    fresh.restore(saved)
    # Assert: the same carried state, scores and next round's upload
    assert_same(fresh.persistent(), saved)
    assert fresh.evaluate(model, plan, glob, None) == trained.evaluate(model, plan, glob, None)
    nxt = ctx(plan, round=2)
    assert_same(fresh.train(model, nxt, glob).state, trained.train(model, nxt, glob).state)


@pytest.mark.parametrize("scheme", ["fedper", "ditto"])
def test_a_resumed_run_matches_an_uninterrupted_one(scheme, small_cfg, tmp_path) -> None:
    # Prepare: a reference run and one stopped after round 1 (a checkpoint every round)
    cfg = ("rounds=2", "checkpoint_every=1", f"scheme={scheme}")
    ref = run(small_cfg(*cfg), tmp_path / "ref", backend="inprocess")

    def stop(r, _summary):
        if r == 1:
            raise Stop

    with pytest.raises(Stop):
        run(small_cfg(*cfg), tmp_path / "cut", backend="inprocess", on_round=stop)
    # Execute
    resumed = run(compose("config", [f"resume={tmp_path / 'cut'}"]), backend="inprocess")
    # Assert: personal heads / models came back from the checkpoint exactly
    pd.testing.assert_frame_equal(resumed.metrics, ref.metrics)


# --- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: Ditto(lam=-0.1), "scheme.lam"),
        (lambda: Reptile(adapt_steps=-1), "scheme.adapt_steps"),
        (lambda: Reptile(server_lr=1.5), "scheme.server_lr"),
        (lambda: FineTune(finetune_steps=-3), "scheme.finetune_steps"),
        (lambda: FineTune(finetune_epochs=1.5), "scheme.finetune_epochs"),
        (lambda: FedPer(personal_keys="head"), "scheme.personal_keys"),
        (lambda: FedPer(personal_keys=[]), "scheme.personal_keys"),
        (lambda: FedPer(personal_keys=["3.", ""]), "scheme.personal_keys"),
        (lambda: FedPer(cohort_fraction=0.0), "scheme.cohort_fraction"),
    ],
)
def test_bad_arguments_name_their_key(make, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == key


@pytest.mark.parametrize("override, key", [("scheme.lam=-1", "scheme.lam"), ("scheme.adapt_steps=-2", "scheme.adapt_steps")])
def test_bad_values_fail_config_validation_before_any_actor(override, key, small_cfg) -> None:
    scheme = "ditto" if "lam" in override else "reptile"
    with pytest.raises(ConfigError) as err:
        load_spec(small_cfg(f"scheme={scheme}", override))
    assert err.value.key == key


def test_fedper_accepts_a_list_of_prefixes_from_the_config(small_cfg) -> None:
    ledger = run(small_cfg("scheme=fedper", "model=mlp", 'scheme.personal_keys=["1."]'), backend="inprocess").ledger
    sent = ledger[ledger.participated & (ledger.institution != "global")]
    assert (sent.bytes_up == (64 * 10 + 10) * 4).all()  # only the head crosses when the body is kept home

