"""No silence over ten seconds: a long step of a run says what it is doing."""

from __future__ import annotations

import logging
import time

from sim.core.heartbeat import Heartbeat


def test_a_long_quiet_step_is_named_and_a_quick_or_talkative_one_is_not(caplog):
    # Prepare: a heartbeat that speaks after 0.3 s of silence
    with caplog.at_level(logging.INFO, logger="collabsim"):
        with Heartbeat("[fedavg]", every=0.3) as beat:
            # Execute: a quick step, a step that prints its own lines often enough, then a long silent one
            beat.phase("building the data")
            time.sleep(0.1)
            beat.phase("in round 1/2")
            beat.touch()
            for _ in range(4):
                time.sleep(0.15)
                beat.touch()
            beat.phase("loading the model into 8 actors")
            time.sleep(1.0)
        said = [r.getMessage() for r in caplog.records]
        time.sleep(0.5)
    # Assert: only the silent step is named, about every 0.3 s, with how long it has taken; nothing after stop()
    assert said and all(m.startswith("[fedavg] still loading the model into 8 actors (") for m in said[1:]), said
    assert said[0].startswith(("[fedavg] now loading the model", "[fedavg] still loading the model"))
    assert 3 <= len(said) <= 5
    assert [r.getMessage() for r in caplog.records] == said


def test_a_long_step_is_named_on_stderr_before_any_logging_is_set_up(capsys, monkeypatch):
    # Prepare: no handler anywhere (a command builds its data early, before Hydra sets its logging up)
    from sim.core import heartbeat

    monkeypatch.setattr(heartbeat.log, "hasHandlers", lambda: False)
    # Execute: a silent step longer than the heartbeat's silence
    with Heartbeat("[fedavg]", every=0.3) as beat:
        beat.phase("building the data (20 institutions)")
        time.sleep(0.8)
    # Assert: its lines reach stderr all the same
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("[fedavg] ") and "building the data (20 institutions) (" in line for line in err), err
