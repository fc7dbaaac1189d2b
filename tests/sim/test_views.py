"""Views of the same entities (sim.core.data.views, sim.vertical, agents.schemes.split_learning and psi): bad views
refused in one line, the private set intersection, split learning against its baselines, determinism and bytes."""

from __future__ import annotations

import ast

import numpy as np
import pandas as pd
import pytest

from agents.schemes.psi import POINT, align, bytes_of_alignment
from agents.schemes.split_learning import FLOAT, Block, epoch_bytes
from sim.checks import load_spec
from sim.cli import compose
from sim.core.data.code_structure import features
from sim.core.types import GLOBAL, ConfigError

PARTIES = ("scenario.institutions=[{name:hospital,discipline:medicine,share:0.5},"
           "{name:bank,discipline:finance,share:0.5}]")
VIEWS = "data.views={hospital:[a1,a2],bank:[b1,b2]}"


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    """600 entities whose label needs both views: y = [a1 + b1 > 0] (each view alone sees half of the signal)."""
    rng = np.random.default_rng(0)
    a1, a2, b1, b2 = rng.normal(size=(4, 600))
    df = pd.DataFrame({"pid": [f"patient-{i:04d}" for i in range(600)], "a1": a1, "a2": a2, "b1": b1, "b2": b2,
                       "label": (a1 + b1 > 0).astype(int)})
    path = tmp_path_factory.mktemp("views") / "cases.csv"
    df.to_csv(path, index=False)
    return str(path)


def cfg(table: str, *overrides: str):
    """A vertical run config on the tiny table, in this process."""
    return compose("config", ["data=table", f"data.path={table}", PARTIES, VIEWS, "data.label_holder=hospital",
                              "data.entity_column=pid", "scheme=split_learning", "rounds=8", "training.local_epochs=1",
                              "training.lr=0.01",
                              "training.optimizer=adamw", "training.schedule=constant", "engine.backend=inprocess",
                              "checkpoint_every=0", *overrides])


@pytest.mark.parametrize("override, key, words", [
    ("data.views={hospital:[a1,a2,zz],bank:[b1,b2]}", "data.views.hospital", "no column 'zz'"),
    ("data.views={hospital:[a1,a2,b1],bank:[b1,b2]}", "data.views", "column 'b1' is in the views of both"),
    ("data.views={hospital:[a1],bank:[b1,b2]}", "data.views", "'a2'"),
    ("data.views={hospital:[a1,a2,label],bank:[b1,b2]}", "data.views.hospital", "data.label_column"),
    ("data.label_holder=null", "data.label_holder", "no institution holds the labels"),
    ("data.label_holder=clinic", "data.label_holder", "'clinic' holds no view"),
    ("scenario.institutions=[{name:hospital,discipline:medicine,share:0.4},{name:bank,discipline:finance,share:0.3},"
     "{name:insurer,discipline:finance,share:0.3}]", "data.views", "'insurer' of scenario"),
    ("scheme=fedavg", "scheme", "one feature space"),
])
def test_bad_views_are_refused_in_one_line_naming_the_key(table, override, key, words) -> None:
    # Execute: the pre-run checks every command calls
    with pytest.raises(ConfigError) as err:
        load_spec(cfg(table, override))
    # Assert: one line, the key first, the offending column or institution named
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_split_learning_without_views_is_refused() -> None:
    with pytest.raises(ConfigError, match="split_learning trains a bottom model"):
        load_spec(compose("config", ["scheme=split_learning", "smoke=true"]))


def test_a_run_without_views_keeps_its_config_and_id_free_of_view_keys() -> None:
    # Runs of one feature space hash (run ids) as before views existed
    spec = load_spec(compose("config", ["data=digits", "smoke=true"]))
    assert not {"views", "label_holder", "overlap"} & set(spec.config["data"])


def test_psi_finds_the_intersection_books_its_bytes_and_shows_no_identifier() -> None:
    # Prepare: two partly overlapping sets of identifiers, in unrelated orders
    mine = np.array([f"patient-{i:04d}" for i in range(0, 60)], dtype=object)
    theirs = np.array([f"patient-{i:04d}" for i in range(40, 100)][::-1], dtype=object)
    # Execute
    a = align({"hospital": mine, "bank": theirs}, "hospital", seed=3)
    # Assert: the same entities, in the same order, on both sides; exactly the common ones
    assert list(mine[a.rows["hospital"]]) == list(theirs[a.rows["bank"]]) == [f"patient-{i:04d}" for i in range(40, 60)]
    # Assert: the bytes booked are the protocol's (32-byte points, 4-byte positions), both ways
    expected = bytes_of_alignment({"hospital": 60, "bank": 60}, "hospital", 20)
    assert a.bytes_of("bank") == expected["bank"] and a.bytes_of("hospital") == expected["hospital"]
    assert expected["bank"][0] == POINT * 120
    # Assert: no identifier (nor its hash input) appears in anything that crossed
    wire = b"".join(m.payload.tobytes() for m in a.messages)
    assert not any(i.encode() in wire for i in [*mine, *theirs])
    assert align({"hospital": mine, "bank": theirs}, "hospital", seed=3).messages[0].payload.tobytes() == \
        a.messages[0].payload.tobytes()  # seeded: the same messages again


@pytest.fixture(scope="module")
def runs(table):
    """split_learning (twice), the label holder alone and pooled views on the tiny table, in this process."""
    from sim.engine import run

    out = {name: run(cfg(table, f"scheme={name}")) for name in ("split_learning", "isolated", "pooled")}
    out["again"] = run(cfg(table))
    return out


def final(result, metric: str = "accuracy") -> float:
    m = result.metrics
    return float(m[(m.institution == GLOBAL) & (m.metric == metric)].sort_values("round").value.iloc[-1])


def test_split_learning_learns_beyond_one_view_and_pooled_views_learn_too(runs) -> None:
    # Each view alone sees half the signal (about 75% at best), chance is 50%; together they see all of it
    assert final(runs["split_learning"]) > 0.85
    assert final(runs["isolated"]) < final(runs["split_learning"]) - 0.05
    assert final(runs["pooled"]) > 0.85
    # Assert: only the label holder trains alone, and nothing crosses
    led = runs["isolated"].ledger
    assert led[led.institution == "bank"].participated.sum() == 0 and led.bytes_up.sum() + led.bytes_down.sum() == 0


def test_the_same_seed_gives_identical_results(runs) -> None:
    pd.testing.assert_frame_equal(runs["split_learning"].metrics, runs["again"].metrics)
    pd.testing.assert_frame_equal(runs["split_learning"].ledger.drop(columns="compute_seconds"),
                                  runs["again"].ledger.drop(columns="compute_seconds"))


def test_bytes_per_epoch_are_embeddings_up_and_gradients_down(runs) -> None:
    # Prepare: the run's aligned training, validation and test entities (all 600 held by both: overlap 1)
    inst = runs["split_learning"].institutions.set_index("institution")
    train, test = int(inst.loc["bank", "train_samples"]), int(inst.loc["bank", "test_samples"])
    val = 600 - train - test
    led = runs["split_learning"].ledger.set_index(["round", "institution"])
    # Assert: round 2 (no alignment): 16 floats per entity up and down for training, up again for scoring val + test
    up, down = epoch_bytes([Block("bank", ("bank",))], "hospital", train, 16)["bank"]
    assert (int(led.loc[(2, "bank"), "bytes_up"]), int(led.loc[(2, "bank"), "bytes_down"])) == \
        (up + FLOAT * 16 * (val + test), down) == (4 * 16 * (train + val + test), 4 * 16 * train)
    # the label holder is the hub (as the coordinator is): what it exchanges is booked once, on its partners' rows
    assert led.loc[[(1, "hospital"), (2, "hospital")], ["bytes_up", "bytes_down"]].to_numpy().sum() == 0
    # Assert: round 1 adds the private set intersection (32-byte points both ways, positions down)
    psi = bytes_of_alignment({"hospital": 600, "bank": 600}, "hospital", 600)["bank"]
    assert int(led.loc[(1, "bank"), "bytes_up"]) == up + FLOAT * 16 * (val + test) + psi[0]


def test_code_structure_counts_what_the_source_holds() -> None:
    src = ("@cache\ndef f(a, b=1, *rest, c=2, **kw) -> int:\n    if a:\n        for x in rest:\n"
           "            raise ValueError\n    yield b\n    return g(a)\n")
    row = features(ast.parse(src).body[0])
    assert (row["args"], row["defaults"], row["kwonly"], row["varargs"], row["varkw"], row["decorators"]) == \
        (2, 2, 1, 1, 1, 1)
    assert (row["raises"], row["yields"], row["returns"], row["nesting"], row["lines"]) == (1, 1, 1, 2, 6)


def test_the_summary_says_the_parties_without_labels_get_nothing_alone(runs) -> None:
    from sim.core.caveats import caveats

    said = caveats([runs["split_learning"].config])
    assert any(s.startswith("bank holds a view of the same entities but no labels") for s in said), said


def test_coalitions_of_views_value_each_view_and_labels(table, tmp_path) -> None:
    from sim.contribution import coalition_values
    from sim.engine import run

    # Prepare: a run directory of split learning on the tiny table, two epochs a round
    run(cfg(table, "training.local_epochs=2", "rounds=4"), tmp_path / "run")
    # Execute: every coalition of the two views, in this process
    values, players = coalition_values(tmp_path / "run")
    full, hospital, bank, empty = (values[frozenset(c)] for c in (players, {"hospital"}, {"bank"}, ()))
    # Assert: without the label holder nobody trains (the untrained model's score); each view adds to the other
    assert bank == empty and full > hospital + 0.05 and hospital > empty


def test_a_stopped_vertical_run_resumes_to_the_numbers_of_one_run_straight_through(table, tmp_path, monkeypatch) -> None:
    import agents.schemes.split_learning as split_learning
    from sim.core import checkpoint
    from sim.engine import run

    # Prepare: the straight run, then the same run stopped in round 4 (status failed, nothing written but the status)
    straight = run(cfg(table))
    real = split_learning.SplitModel.epoch

    def stop_in_round_4(self, rows, y, round, again=0):
        if round == 4:
            raise RuntimeError("stopped")
        return real(self, rows, y, round, again)

    monkeypatch.setattr(split_learning.SplitModel, "epoch", stop_in_round_4)
    with pytest.raises(RuntimeError, match="stopped"):
        run(cfg(table), tmp_path / "run")
    assert checkpoint.read_status(tmp_path / "run")["state"] == "failed"
    monkeypatch.setattr(split_learning.SplitModel, "epoch", real)
    # Execute: python -m sim resume=DIR's path (a vertical run keeps no checkpoint: it runs again from round 0)
    resumed = run(compose("config", [f"resume={tmp_path / 'run'}"]))
    # Assert: the same numbers as straight through, and the run directory complete
    keep = ["round", "institution", "metric", "value"]
    pd.testing.assert_frame_equal(resumed.metrics[keep], straight.metrics[keep], check_exact=True)
    assert checkpoint.read_status(tmp_path / "run")["state"] == "complete"
