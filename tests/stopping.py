"""A driver that goes away after a round, for tests of checkpoints and resume (tests/ is on sys.path via its conftest)."""


class Stop(Exception):
    """Stands for the driver going away after a round."""


def stop_after(k):
    """An ``on_round`` hook that raises :class:`Stop` once round ``k`` is done (a driver killed after round k)."""

    def on_round(r, summary):
        if r == k:
            raise Stop(f"stopped after round {k}")

    return on_round


RESUMABLE = ["smoke=false", "rounds=4", "data.num_samples=600", "checkpoint_every=1", "training.local_epochs=1"]
"""A run small enough to stop after round 2 and resume, with a checkpoint every round."""


def resume_matches_straight(overrides, tmp_path):
    """Run RESUMABLE + ``overrides`` straight through, and stopped after round 2 then resumed, and once more from
    scratch; assert every metric of every round is identical; return the straight run."""
    import pandas as pd

    from sim.cli import compose
    from sim.engine import run

    cfg = compose("config", RESUMABLE + list(overrides))
    ref = run(cfg, tmp_path / "ref", backend="inprocess")
    try:
        run(cfg, tmp_path / "cut", backend="inprocess", on_round=stop_after(2))
    except Stop:
        pass
    else:
        raise AssertionError("the run was not stopped after round 2")
    resumed = run(compose("config", [f"resume={tmp_path / 'cut'}"]), backend="inprocess")
    pd.testing.assert_frame_equal(resumed.metrics, ref.metrics)
    again = run(cfg, tmp_path / "again", backend="inprocess")
    pd.testing.assert_frame_equal(again.metrics.drop(columns="run_id"), ref.metrics.drop(columns="run_id"))
    return ref
