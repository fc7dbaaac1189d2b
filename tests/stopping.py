"""A driver that goes away after a round, for tests of checkpoints and resume (tests/ is on sys.path via its conftest)."""


class Stop(Exception):
    """Stands for the driver going away after a round."""


def stop_after(k):
    """An ``on_round`` hook that raises :class:`Stop` once round ``k`` is done (a driver killed after round k)."""

    def on_round(r, summary):
        if r == k:
            raise Stop(f"stopped after round {k}")

    return on_round
