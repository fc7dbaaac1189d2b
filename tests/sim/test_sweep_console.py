"""What the commands print: one line per sweep trial, intervals only from enough seeds, a run's summary, compare's seeds."""

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from sim.cli import compose
from sim.sweep.space import load_sweep
from sim.sweep.results import progress_line, render, summarize


def sweep_of(**fields):
    """A sweep spec from conf/sweep_main.yaml's defaults plus ``fields``."""
    return load_sweep({**compose("sweep_main", ["sweep=compare_schemes"]).sweep, **fields})


# ---- one line per trial --------------------------------------------------------------------------

def test_a_finished_trial_is_one_line_with_its_values_metric_and_time():
    spec = sweep_of(space={"scheme": {"grid": ["fedprox"]}, "scheme.mu": {"grid": [0.01]}})
    result = {"global_accuracy": 0.91234, "round": 20, "rounds": 20, "started": 100.0, "finished": 112.5}
    line = progress_line(spec, {"scheme": "fedprox", "scheme.mu": 0.01, "seed": 2}, result, 3, 10, None, 75.0)
    assert line == "trial 3/10 finished: scheme=fedprox scheme.mu=0.01 seed=2  global_accuracy 0.912  (12.5 s; sweep 1 min 15 s)"


def test_a_trial_stopped_early_and_a_failed_trial_say_so():
    spec = sweep_of()
    stopped = progress_line(spec, {"scheme": "fedavg", "seed": 0}, {"global_accuracy": 0.5, "round": 5, "rounds": 20}, 1, 4)
    assert "stopped at round 5/20" in stopped and stopped.count("\n") == 0
    error = RuntimeError("ray::ImplicitFunc.train()\nTraceback (most recent call last):\nValueError: shards do not fit")
    failed = progress_line(spec, {"scheme": "fedavg", "seed": 1}, {}, 2, 4, error, 30.0)
    assert failed == "trial 2/4 failed: scheme=fedavg seed=1: ValueError: shards do not fit  (sweep 30.0 s)"


def test_tune_tables_are_off_and_the_progress_callback_on_unless_tune_verbose(tmp_path):
    from ray import tune

    from sim.sweep import run_config

    quiet, loud = run_config(sweep_of(), tmp_path), run_config(sweep_of(tune_verbose=True), tmp_path)
    assert quiet.verbose == 0 and [type(c).__name__ for c in quiet.callbacks] == ["Progress"]
    assert isinstance(quiet.callbacks[0], tune.Callback)
    assert loud.verbose == 1 and not loud.callbacks


def test_the_callback_counts_finished_trials_including_the_one_finishing(capsys):
    from sim.sweep import run_config

    spec = sweep_of()
    callback = run_config(spec, Path("/tmp")).callbacks[0]
    callback.setup()
    trial = lambda status, seed: SimpleNamespace(status=status, config={"scheme": "fedavg", "seed": seed},  # noqa: E731
                                                 last_result={"global_accuracy": 0.8, "round": 3, "rounds": 3})
    trials = [trial("TERMINATED", 0), trial("RUNNING", 1), trial("PENDING", 2)]
    callback.on_trial_complete(0, trials, trials[1])  # Tune marks it TERMINATED only after the callbacks
    out = capsys.readouterr().out
    assert out.startswith(f"trial 2/{spec.trial_count()} finished: scheme=fedavg seed=1  global_accuracy 0.800")


def test_tune_verbose_must_be_true_or_false():
    from sim.core.types import ConfigError

    with pytest.raises(ConfigError, match="sweep.tune_verbose: expected true or false"):
        sweep_of(tune_verbose="yes")


# ---- intervals only from enough seeds ------------------------------------------------------------

def _trials(seeds: int) -> pd.DataFrame:
    """Complete trials of isolated and fedavg over ``seeds`` seeds, with spread in the metric and the gain."""
    rows = [{"trial_id": f"{s}{k}", "status": "complete", "scheme": s, "seed": k,
             "global_accuracy": 0.5 + 0.1 * k + (0.2 if s == "fedavg" else 0.0),
             "mean_gain": 0.0 if s == "isolated" else [-25.0, 10.0, 3.0][k]}
            for s in ("isolated", "fedavg") for k in range(seeds)]
    return pd.DataFrame(rows)


def test_two_seeds_give_no_interval_and_one_note_three_seeds_give_intervals():
    spec = sweep_of()
    two = summarize(spec, _trials(2))
    assert two[["global_accuracy_low", "mean_gain_high"]].isna().all().all()
    text = render(spec, _trials(2), two, Path("/sweep"))
    assert text.count("too few seeds") == 1 and "[" not in text.split("best by")[0].split("\n", 3)[3]
    three = summarize(spec, _trials(3))
    assert not math.isnan(three.loc[three["scheme"] == "fedavg", "mean_gain_low"].iloc[0])
    assert "too few seeds" not in render(spec, _trials(3), three, Path("/sweep"))


# ---- one run's summary, compare's replications ---------------------------------------------------

def _run_tables():
    """A two-institution run's metrics (rounds 0 and 1) and ledger, in the results schema."""
    from sim.core.results import frame

    keys = {"run_id": "r", "scheme": "fedavg", "scenario": "mysites", "seed": 0}
    metrics = frame("metrics", [keys | {"round": r, "institution": i, "discipline": d, "metric": "accuracy", "value": v}
                                for r, acc in ((0, (0.1, 0.2, 0.3)), (1, (0.81, 0.92, 0.88)))
                                for (i, d), v in zip((("site_a", "medicine"), ("site_b", "physics"), ("global", "global")), acc)])
    ledger = frame("ledger", [keys | {"round": 1, "institution": i, "participated": True, "bytes_up": 1_500_000,
                                      "bytes_down": 2_000_000, "compute_seconds": 1.0, "simulated_seconds": 1.0,
                                      "samples": 10, "epsilon": math.nan, "status": "ok"} for i in ("site_a", "site_b")])
    return metrics, ledger


def test_a_run_ends_with_each_institutions_accuracy_the_global_models_and_megabytes():
    from sim.__main__ import run_summary

    text = run_summary(*_run_tables())
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines()[2:4]}
    assert rows["site_a"][-1] == "0.810" and rows["site_b"][-1] == "0.920"  # the final round, not round 0
    assert "global" in text and "global test set     0.880" in text
    assert text.splitlines()[-1] == "exchanged: 7.00 MB (3.00 up, 4.00 down)"


@pytest.mark.parametrize("argv, use", [(["-m", "seed=0,1,2"], "use seeds=3 "), (["--multirun", "seed=4,5"], "use seed=4 seeds=2 "),
                                       (["seed=range(0,3)"], "use seeds=3 ")])
def test_compare_refuses_a_seed_sweep_with_one_line_saying_use_seeds(argv, use):
    proc = subprocess.run([sys.executable, "-m", "sim.compare", *argv, "smoke=true"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: compare runs replications itself: " + use)
    assert "instead of -m seed=..." in proc.stderr


def test_a_trial_process_ended_by_tune_prints_no_traceback_for_it(capsys, monkeypatch):
    import gc
    import sys

    from sim.sweep import quiet_when_ending

    class Raises:
        """A finalizer that raises, as one does when Ray's SIGTERM handler fires inside it."""

        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    # Prepare: the trial process's hook
    monkeypatch.setattr(sys, "unraisablehook", quiet_when_ending)
    # Execute: Ray ending the process inside a finalizer, then a real fault in one
    Raises(SystemExit(1))
    gc.collect()
    quiet = capsys.readouterr().err
    Raises(ValueError("a real fault"))
    gc.collect()
    # Assert: nothing about the ending; the real fault still printed as Python prints it
    assert quiet == "" and "ValueError: a real fault" in capsys.readouterr().err
