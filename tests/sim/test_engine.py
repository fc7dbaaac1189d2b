"""The round loop: every scheme runs end to end, results follow the schema, same seed = same numbers."""

import numpy as np
import pandas as pd
import pytest

from sim.engine import run
from sim.core.results import LEDGER_COLUMNS, METRICS_COLUMNS

SCHEMES = ["isolated", "pooled", "fedavg", "fedprox", "fedsgd"]
N = 6  # institutions in the default scenario


def values(result):
    """Metric values in a canonical order (rows keyed by round, institution, metric)."""
    m = result.metrics.sort_values(["round", "institution", "metric"]).reset_index(drop=True)
    return m[["round", "institution", "metric", "value"]]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_runs_and_writes_tidy_tables(scheme, small_cfg, tmp_path):
    # Execute
    result = run(small_cfg(f"scheme={scheme}"), tmp_path, backend="inprocess")
    # Assert: one row per round x institution x metric, and the schema's columns
    m, ledger = result.metrics, result.ledger
    assert list(m.columns) == list(METRICS_COLUMNS) and list(ledger.columns) == list(LEDGER_COLUMNS)
    scored = m[m.metric.isin(["accuracy", "loss"])]
    assert len(scored) == 3 * (N + 1) * 2  # rounds 0..2, six institutions + global, two metrics
    assert set(m.scheme) == {scheme} and m.value[m.metric == "accuracy"].between(0, 1).all()
    assert len(ledger) == 2 * (N + 1)  # rounds 1..2, six institutions + the coordinator's row
    for name in ("metrics", "ledger", "institutions", "config"):
        assert any(p.name.startswith(name) for p in tmp_path.iterdir())
    assert pd.read_parquet(tmp_path / "metrics.parquet").equals(m)


def test_ledger_counts_the_bytes_each_scheme_really_moves(small_cfg):
    ledger = {s: run(small_cfg(f"scheme={s}"), backend="inprocess").ledger for s in ("isolated", "pooled", "fedavg")}
    inst = {s: df[df.institution != "global"] for s, df in ledger.items()}
    # Going alone moves nothing.
    assert inst["isolated"][["bytes_up", "bytes_down"]].to_numpy().sum() == 0
    # Pooling uploads the raw data once, in round 1, and trains centrally.
    pooled = inst["pooled"]
    assert (pooled[pooled["round"] == 1].bytes_up > 0).all() and (pooled[pooled["round"] == 2].bytes_up == 0).all()
    assert ledger["pooled"].query("institution == 'global'").samples.gt(0).all()
    # FedAvg: every participant sends and receives one model per round, the same size for all.
    fed = inst["fedavg"]
    assert fed.bytes_up.nunique() == 1 and (fed.bytes_up == fed.bytes_down).all() and fed.bytes_up.iloc[0] > 0


def test_same_config_and_seed_give_identical_metrics(small_cfg):
    a = run(small_cfg("scheme=fedprox"), backend="inprocess")
    b = run(small_cfg("scheme=fedprox"), backend="inprocess")
    pd.testing.assert_frame_equal(values(a), values(b))  # exact: no tolerance
    assert a.run_id == b.run_id


def test_another_seed_gives_other_numbers(small_cfg):
    a = run(small_cfg("seed=0"), backend="inprocess")
    b = run(small_cfg("seed=1"), backend="inprocess")
    assert not np.array_equal(values(a).value, values(b).value)


def test_cohort_fraction_limits_who_trains(small_cfg):
    ledger = run(small_cfg("scheme.cohort_fraction=0.5"), backend="inprocess").ledger
    per_round = ledger[ledger.institution != "global"].groupby("round").participated.sum()
    assert (per_round == 3).all()


def test_coalition_runs_only_its_members(small_cfg):
    result = run(small_cfg(), backend="inprocess", institutions=("city_hospital", "credit_union"))
    assert set(result.institutions.institution) == {"city_hospital", "credit_union"}
    assert set(result.metrics.institution) == {"city_hospital", "credit_union", "global"}


@pytest.mark.parametrize("scheme", ["fedavg", "isolated"])
def test_dedicated_pooled_and_inprocess_placement_give_identical_metrics(scheme, small_cfg, ray_cluster):
    # Prepare: one actor per institution, three institutions per actor (2 hosts), and no actors at all
    dedicated = run(small_cfg(f"scheme={scheme}", "placement=dedicated"))
    pooled = run(small_cfg(f"scheme={scheme}", "placement=pooled", "engine.pooled_hosts=2"))
    inprocess = run(small_cfg(f"scheme={scheme}"), backend="inprocess")
    # Assert: bit-identical values, whatever the placement
    pd.testing.assert_frame_equal(values(dedicated), values(pooled))
    pd.testing.assert_frame_equal(values(dedicated), values(inprocess))


def test_a_different_number_of_pooled_hosts_gives_identical_metrics_with_faults(small_cfg, ray_cluster):
    # Prepare: flaky institutions, two per host on three hosts, against no actors at all
    flaky = ["scenario.availability=0.7", "scenario.failure_rate=0.2"]
    three = run(small_cfg(*flaky, "placement=pooled", "engine.pooled_hosts=3"))
    inprocess = run(small_cfg(*flaky), backend="inprocess")
    # Assert: the same values and the same institutions dropped, bit for bit
    pd.testing.assert_frame_equal(values(three), values(inprocess))
    assert three.ledger.status.tolist() == inprocess.ledger.status.tolist()


def test_institutions_a_round_does_not_pick_have_one_idle_row_each(small_cfg, tmp_path):
    # Execute: half the institutions per round; the coordinator sends the others as indices, the engine builds rows
    result = run(small_cfg("scheme=fedavg", "scheme.cohort_fraction=0.5", "rounds=3", "checkpoint_every=2"), tmp_path,
                 backend="inprocess")
    ledger = result.ledger
    # Assert: every round has each institution once (plus the coordinator's row), in round order, schema dtypes
    assert ledger["round"].is_monotonic_increasing
    assert (ledger.groupby("round").institution.nunique() == N + 1).all() and len(ledger) == 3 * (N + 1)
    idle = ledger[(ledger.status == "idle") & (ledger.institution != "global")]
    assert len(idle) == 3 * (N - 3) and not idle.participated.any()  # cohort_fraction 0.5 of six: three a round
    assert (idle[["bytes_up", "bytes_down", "samples"]].to_numpy() == 0).all() and (idle.trained_by == idle.institution).all()
    assert (ledger.groupby("round").sim_time.nunique() == 1).all()  # the round's clock on every row, idle ones too
    assert pd.read_parquet(tmp_path / "ledger.parquet").equals(ledger)


def idle_rows(keys: dict, round: int, sim_time: float, names: list[str], epsilon: float) -> pd.DataFrame:
    """One round's idle rows for every one of ``names``: a single block of :func:`sim.core.results.idle_blocks`."""
    from sim.core.results import idle_blocks

    return idle_blocks([(keys, round, sim_time, np.arange(len(names)), epsilon)], pd.array(names, dtype="string"))


def test_idle_rows_built_as_columns_equal_the_rows_the_coordinator_would_send(small_cfg) -> None:
    from agents.coordinator import _absent, _unshared
    from sim.checks import load_spec
    from sim.core.results import frame, idle_blocks

    specs = load_spec(small_cfg()).scenario.institutions[:3]
    keys = {"run_id": "r", "scheme": "fedavg", "scenario": "s", "seed": 3}
    for epsilon in (2.5, np.nan):
        dicts = [keys | {"round": 4, "epsilon": epsilon, "staleness": np.nan} | _unshared(_absent(s, "idle", 123))
                 | {"sim_time": 7.0} for s in specs]
        pd.testing.assert_frame_equal(idle_rows(keys, 4, 7.0, [s.name for s in specs], epsilon), frame("ledger", dicts))
    # Several rounds' blocks at once (what the run's table frames) equal their tables one after the other
    names = pd.array([s.name for s in specs], dtype="string")
    blocks = [(keys, 4, 7.0, np.array([0, 1, 2]), np.nan), (keys, 5, 9.5, np.array([1]), 1.5),
              (keys | {"seed": 4}, 6, 11.0, np.array([0, 2]), np.nan)]
    one_by_one = [idle_rows(k, r, t, list(names.take(p)), e) for k, r, t, p, e in blocks]
    pd.testing.assert_frame_equal(idle_blocks(blocks, names), pd.concat(one_by_one, ignore_index=True))
    pd.testing.assert_frame_equal(idle_blocks(blocks[:2], names), pd.concat(one_by_one[:2], ignore_index=True))


def test_progress_keeps_idle_rows_as_masks_and_a_checkpoint_brings_them_back(tmp_path) -> None:
    from sim.core import checkpoint
    from sim.core.checkpoint import Progress
    from sim.core.results import LEDGER_COLUMNS
    from sim.core.types import Snapshot

    # Prepare: 20 institutions; rounds 1-3 each with dict rows for two and the rest idle
    names = pd.array([f"inst{i:02d}" for i in range(20)], dtype="string")
    keys = {"run_id": "r", "scheme": "fedavg", "scenario": "s", "seed": 0}

    def ledger_row(name: str, r: int) -> dict:
        zeros = {k: 0 for k, dtype in LEDGER_COLUMNS.items() if dtype in ("int64", "float64")}
        return zeros | keys | {"round": r, "institution": name, "participated": True, "sim_time": float(r),
                               "trained_by": name, "epsilon": np.nan, "staleness": np.nan, "status": "ok", "samples": 5}

    def play(progress: Progress, rounds: range) -> None:
        for r in rounds:
            picked = [r, r + 7]
            progress.add("ledger", [ledger_row(names[i], r) for i in picked])
            progress.add_idle(keys, r, float(r), np.setdiff1d(np.arange(20), picked), 0.5 * r)

    straight = Progress(names=names)
    play(straight, range(1, 4))
    # Execute: the same rounds with a checkpoint after round 2, read back, then round 3
    first = Progress(names=names)
    play(first, range(1, 3))
    first.rounds_done = 2
    checkpoint.save(tmp_path, first, Snapshot({}, {}, {}), "r")
    first.wait()  # written in a thread: on disk once waited for
    resumed, _ = checkpoint.load(tmp_path, "r")
    resumed.names = names
    play(resumed, range(3, 4))
    # Assert: one row per institution per round, participants first, and the resumed table equals the straight one
    table = straight.table("ledger")
    assert len(table) == 60 and table.groupby("round").institution.nunique().eq(20).all()
    assert table.participated.tolist()[:2] == [True, True] and not table.participated.iloc[2:20].any()
    idle3 = table[(table["round"] == 3) & ~table.participated].reset_index(drop=True)
    expected = idle_rows(keys, 3, 3.0, [n for i, n in enumerate(names) if i not in (3, 10)], 1.5)
    pd.testing.assert_frame_equal(idle3, expected)
    pd.testing.assert_frame_equal(resumed.table("ledger"), table)
