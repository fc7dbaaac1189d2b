"""A user's own config folder (``--config-dir DIR`` / ``hydra.searchpath``): seen by every command, checked like conf/."""

import subprocess
import sys
import textwrap

import pytest

import sim.cli
from sim.cli import command_line, compose, group_options, guard, hidden_files, use_search_path
from sim.checks import load_spec

SCENARIO = """\
name: mysites
disciplines: [medicine, physics]
institutions:
  - {name: site_a, discipline: medicine, share: 0.5, cpus: 0.25}
  - {name: site_b, discipline: physics,  share: 0.5, cpus: 0.25}
"""
SCHEME = """\
_target_: agents.schemes.fedprox.FedProx
mu: 0.5    # a stronger pull than conf/scheme/fedprox.yaml's 0.01
"""
SWEEP = """\
name: mine
overrides: [scenario=mysites]
space:
  scheme: {grid: [isolated, strongprox]}
seeds: [0]
"""


@pytest.fixture
def user_conf(tmp_path):
    """A user's config folder laid out like conf/: a scenario, a scheme for an existing class, a sweep."""
    folder = tmp_path / "my conf"  # a space: paths travel quoted
    for rel, text in {"scenario/mysites.yaml": SCENARIO, "scheme/strongprox.yaml": SCHEME, "sweep/mine.yaml": SWEEP}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


@pytest.fixture(autouse=True)
def no_search_path():
    """Each test starts and ends with conf/ alone (the search path is module-level, set by the guard)."""
    use_search_path([])
    yield
    use_search_path([])


def refused(config_name, argv, check, capsys, **kw) -> str:
    """Run the guard on ``argv``; assert exit 2 with exactly one 'error: ' line, return it."""
    with pytest.raises(SystemExit) as exit_:
        guard(config_name, argv, check, **kw)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("spelling", ["--config-dir {d}", "--config-dir={d}", "-cd {d}",
                                      "hydra.searchpath=[file://{d}]", "hydra.searchpath=['{d}']"])
def test_every_spelling_of_a_config_folder_is_read_from_the_command_line(user_conf, spelling):
    head, _, rest = spelling.partition(" ")
    argv = [head.format(d=user_conf), *([rest.format(d=user_conf)] if rest else []), "scenario=mysites", "-m"]
    overrides, entries = command_line(argv)
    assert overrides == ["scenario=mysites"]
    assert entries == [f"file://{user_conf}"]


def test_the_guard_accepts_user_files_and_compose_then_sees_them(user_conf):
    guard("config", ["--config-dir", str(user_conf), "scenario=mysites", "scheme=strongprox"], load_spec)
    cfg = compose("config", ["scenario=mysites", "scheme=strongprox"])  # as compare and the sweep call it
    assert cfg.scenario.name == "mysites" and cfg.scheme.mu == 0.5
    assert load_spec(cfg).scenario.names == ("site_a", "site_b")
    assert {"mysites", "default"} <= set(group_options("scenario"))
    assert {"strongprox", "fedavg"} <= set(group_options("scheme"))


def test_without_the_folder_a_user_option_is_unknown(user_conf, capsys):
    err = refused("config", ["scenario=mysites"], load_spec, capsys)
    assert "scenario: unknown option 'mysites'" in err


def test_a_bad_key_in_a_user_scenario_is_one_line_naming_key_and_file(user_conf, capsys):
    (user_conf / "scenario" / "mysites.yaml").write_text(SCENARIO + "site_count: 2\n")
    err = refused("config", [f"--config-dir={user_conf}", "scenario=mysites"], load_spec, capsys)
    assert "scenario.site_count: unknown key" in err
    assert str(user_conf / "scenario" / "mysites.yaml") in err


def test_broken_yaml_in_a_user_file_names_file_and_line(user_conf, capsys):
    (user_conf / "scenario" / "broken.yaml").write_text("name: broken\ndisciplines: [medicine\n")
    err = refused("config", ["--config-dir", str(user_conf), "scenario=broken"], load_spec, capsys)
    assert str(user_conf / "scenario" / "broken.yaml") in err and "not valid YAML" in err


@pytest.mark.parametrize("argv, named", [
    (["--config-dir", "/no/such/folder"], "--config-dir: '/no/such/folder' is not a folder"),
    (["--config-dir"], "--config-dir: '' is not a folder"),
    (["hydra.searchpath=[file:///no/such/folder]"], "hydra.searchpath: 'file:///no/such/folder' is not a folder"),
    (["hydra.searchpath=file:///tmp"], "hydra.searchpath: expected a list of folders"),
])
def test_a_missing_config_folder_is_refused(argv, named, capsys):
    assert named in refused("config", argv, load_spec, capsys)


def test_a_user_file_named_like_a_built_in_one_is_reported_hidden(user_conf, capsys):
    (user_conf / "scheme" / "fedavg.yaml").write_text(SCHEME)
    guard("config", ["--config-dir", str(user_conf)], load_spec)
    assert [p.name for p, _ in hidden_files()] == ["fedavg.yaml"]
    assert "fedavg.yaml is hidden by" in capsys.readouterr().err
    assert compose("config", ["scheme=fedavg"]).scheme._target_.endswith("FedAvg")  # as Hydra: conf/ first


def test_compare_composes_each_scheme_from_the_user_folder(user_conf):
    from sim.compare import check, scheme_configs

    argv = ["--config-dir", str(user_conf), "scenario=mysites", "schemes=[isolated,strongprox]"]
    guard("compare", argv, check, with_overrides=True)
    cfg = compose("compare", argv[2:])
    configs = scheme_configs(cfg, argv[2:])
    assert configs["strongprox"].scheme.mu == 0.5
    assert all(c.scenario.name == "mysites" for c in configs.values())


def test_sweep_trials_compose_with_the_user_folder_in_another_process(user_conf):
    from sim.sweep.space import load_sweep
    from sim.sweep import base_overrides, check, trial_config

    guard("sweep_main", ["--config-dir", str(user_conf), "sweep=mine"], check, with_overrides=True)
    spec = load_sweep(compose("sweep_main", ["sweep=mine"]).sweep)
    base = base_overrides(spec, ["sweep=mine"])
    use_search_path([])  # a Tune worker: nothing set from the command line, only what base carries
    cfg = trial_config(base, {"scheme": "strongprox", "seed": 0})
    assert cfg.scenario.name == "mysites" and cfg.scheme.mu == 0.5


def test_a_bad_user_sweep_file_is_refused_naming_the_key(user_conf, capsys):
    from sim.sweep import check

    (user_conf / "sweep" / "mine.yaml").write_text(SWEEP + "seeds_typo: [1]\n")
    err = refused("sweep_main", ["--config-dir", str(user_conf), "sweep=mine"], check, capsys, with_overrides=True)
    assert "sweep.seeds_typo: unknown key" in err and "mine.yaml" in err


@pytest.mark.slow
def test_one_run_with_a_user_scenario_and_scheme_prints_its_institutions(user_conf, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sim", "--config-dir", str(user_conf), "scenario=mysites",
                           "scheme=strongprox", "smoke=true", "engine.backend=inprocess", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"results: {out}"
    assert any(ln.split()[:2] == ["site_a", "medicine"] for ln in lines), textwrap.indent(proc.stdout, "  ")
    assert (out / "metrics.parquet").is_file()
