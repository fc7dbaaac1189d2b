"""Bad input: one clear line naming the key, exit status 2, nothing started, nothing written."""

import subprocess
import sys

import pytest

from sim.cli import guard
from sim.checks import load_spec


@pytest.mark.parametrize(
    "override, named",
    [
        ("scheme=fedxx", "scheme: unknown option 'fedxx'"),
        ("model=transformer9", "model: unknown option"),
        ("data=imagenet", "data: unknown option"),
        ("scenario.num_institutionz=20", "scenario.num_institutionz: unknown config key; did you mean scenario.num_institutions?"),
        ("scenario.institutions.0.share=-0.1", "scenario.institutions[0].share: must be > 0"),
        ("scenario.institutions.0.share=0.5", "scenario.institutions: shares add up to"),
        ("rounds=0", "rounds: expected a whole number >= 1"),
        ("placement=everywhere", "placement: unknown placement"),
        ("training.lr=-1", "training.lr"),
        ("scheme.mu=0.1", "scheme"),  # fedavg has no mu
    ],
)
def test_bad_override_gives_one_line_naming_the_key(override, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        guard("config", [override], load_spec)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert named in err


def test_bad_value_in_a_multirun_sweep_is_caught(capsys):
    with pytest.raises(SystemExit):
        guard("config", ["-m", "scheme=fedavg,fedxx"], load_spec)
    assert "fedxx" in capsys.readouterr().err


def test_good_overrides_pass_the_guard():
    guard("config", ["scheme=fedprox", "scheme.mu=0.1", "rounds=3", "scenario.num_institutions=20"], load_spec)


@pytest.mark.slow
def test_command_line_refuses_before_starting_anything(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "scheme=fedxx", f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "fedxx" in proc.stderr
    assert not out.exists()  # no run directory, so nothing half-written and no actor started


def test_hydra_composes_no_extra_config_for_its_run_mode_where_nothing_can_set_it(monkeypatch):
    from hydra._internal.hydra import Hydra

    from sim import cli

    # Prepare: Hydra's own probe (it composes the whole config to read hydra.mode)
    probe = Hydra.get_mode
    monkeypatch.setattr(cli, "SEARCH_PATH", [])
    # Execute / Assert: a plain command's mode is known (nothing sets it), and the probe comes back afterwards
    with cli._known_mode(["scheme=fedavg", "rounds=3"]):
        assert Hydra.get_mode is not probe and Hydra.get_mode(None, "config", ["hydra.mode=MULTIRUN"]) is None
    assert Hydra.get_mode is probe
    # ... but an override that may set it, or a config folder of the user's, keeps Hydra's probe
    for argv in (["hydra.mode=MULTIRUN"], ["hydra/sweeper=basic"], ["+hydra.mode=RUN"]):
        with cli._known_mode(argv):
            assert Hydra.get_mode is probe
    monkeypatch.setattr(cli, "SEARCH_PATH", ["file:///somewhere/conf"])
    with cli._known_mode(["rounds=3"]):
        assert Hydra.get_mode is probe
