"""The Python API (sim.api) gives what the commands give: the same configs, numbers, one-line errors and directories.

One command-line run (a subprocess) and its API twin, and the example notebook executed on a
Jupyter kernel, are the expensive parts; every other test reads what they left or only composes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from sim import api
from sim.checks import load_spec
from sim.cli import guard

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "docs" / "tutorials" / "notebook.ipynb"
# fedprox with its own mu and a nested data key: keywords of each kind, and the command line they stand for
KEYS = dict(smoke=True, rounds=2, scheme="fedprox", scheme__mu=0.05, data={"num_samples": 600},
            engine__backend="inprocess")
ARGV = ["smoke=true", "rounds=2", "scheme=fedprox", "scheme.mu=0.05", "data.num_samples=600", "engine.backend=inprocess"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same run from ``python -m sim ARGV`` and from ``api.run(api.compose(**KEYS))``."""
    tmp = tmp_path_factory.mktemp("twins")
    proc = subprocess.run([sys.executable, "-m", "sim", *ARGV, f"hydra.run.dir={tmp / 'cli'}"], capture_output=True,
                          text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = api.compose(**KEYS)
    return tmp, config, api.run(config, out=tmp / "api", progress=False)


def test_compose_writes_keywords_as_the_command_line_overrides():
    assert list(api.compose(**KEYS).overrides) == ARGV
    assert api.compose(**KEYS).command == "python -m sim " + " ".join(ARGV)
    # Strings that Hydra would read as something else stay strings; lists and paths are written in its grammar
    from sim.api.config import overrides_of

    assert overrides_of(["seed=1"], {"a__b": "true", "c": [1, "x y"], "d": None, "e": 1e-5}, "cheaters") == [
        "seed=1", "+experiment=cheaters", "a.b='true'", "c=[1,'x y']", "d=null", "e=1e-05"]


def test_run_and_the_command_line_give_identical_metrics(twins):
    tmp, _, run = twins
    # Byte for byte: the same config and seed give the same table, whichever way the run was started
    assert (tmp / "cli" / "metrics.parquet").read_bytes() == (run.path / "metrics.parquet").read_bytes()
    pd.testing.assert_frame_equal(api.load(tmp / "cli").metrics, run.metrics)
    assert (tmp / "cli" / "config.yaml").read_text() == (run.path / "config.yaml").read_text()
    # The same files; Hydra's .hydra/ and its log aside, whose place the API's collabsim.log takes, at INFO
    assert "[fedprox] round 2/2" in (run.path / "collabsim.log").read_text()
    assert sorted(p.name for p in run.path.iterdir()) == sorted(
        [p.name for p in (tmp / "cli").iterdir() if p.name not in (".hydra", "__main__.log")] + ["collabsim.log"])


def test_defaults_are_the_command_lines(twins):
    tmp, config, _ = twins
    # What Hydra composed for the command (its .hydra/config.yaml) is what compose() gives, every default included;
    # a plain dict is read as the same keywords, not as a config with defaults of its own
    cli = yaml.safe_load((tmp / "cli" / ".hydra" / "config.yaml").read_text())
    assert OmegaConf.to_container(config.tree) == cli
    assert OmegaConf.to_container(api.compose(**{k: v for k, v in KEYS.items()}).tree) == cli
    from sim.api import _as_config

    assert OmegaConf.to_container(_as_config(dict(KEYS)).tree) == cli


def test_a_saved_config_runs_again_to_the_same_numbers(twins, tmp_path):
    _, _, run = twins
    again = api.run(run.config, out=tmp_path / "again", progress=False)
    pd.testing.assert_frame_equal(again.metrics, run.metrics)


@pytest.mark.parametrize("keys, argv", [
    ({"rounds_": 5}, ["rounds_=5"]),                            # unknown key: did you mean rounds?
    ({"data__alpah": 0.1}, ["data.alpah=0.1"]),                 # unknown nested key
    ({"scheme": "fedxx"}, ["scheme=fedxx"]),                    # unknown option
    ({"rounds": "five"}, ["rounds=five"]),                      # wrong type
    ({"training": {"lr": -1}}, ["training.lr=-1"]),             # out of range
    ({"scheme__mu": 0.1}, ["scheme.mu=0.1"]),                   # a key the chosen scheme does not have
])
def test_bad_keys_raise_the_line_the_command_prints(keys, argv, capsys):
    with pytest.raises(SystemExit):
        guard("config", argv, load_spec)
    line = capsys.readouterr().err.strip().removeprefix("error: ")
    with pytest.raises(api.ConfigError) as err:
        api.compose(**keys)
    assert str(err.value) == line and str(err.value).startswith(argv[0].split("=")[0].split(".")[0])


def test_a_bad_compare_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from sim.compare import check

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        guard("compare", ["schemes=[fedavg,fedxx]"], check, with_overrides=True)
    line = capsys.readouterr().err.strip().removeprefix("error: ")
    with pytest.raises(api.ConfigError) as err:
        api.compare(["fedavg", "fedxx"])
    assert str(err.value) == line and "schemes: unknown scheme(s) 'fedxx'" in line
    with pytest.raises(api.ConfigError, match="seeds: expected a whole number of seeds >= 1"):
        api.compare(["fedavg"], seeds=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call, named", [
    (lambda: api.compose(rounds=object()), "rounds: expected a number, string, bool, None, list or dict"),
    (lambda: api.compose(5), "overrides: expected strings like 'rounds=5'"),
    (lambda: api.compose(config_dir="no/such/folder"), "config_dir: 'no/such/folder' is not a folder"),
    (lambda: api.run({"rounds": 2}, log_level="LOUD"), "log_level: unknown level 'LOUD'"),
    (lambda: api.compare(["fedavg"], resume=True), "resume: give out=DIR"),
])
def test_bad_arguments_name_the_argument_and_the_fix(call, named):
    with pytest.raises(api.ConfigError, match=named.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call()


def test_load_refuses_what_is_no_finished_result_with_the_commands_line(twins, tmp_path, capsys):
    from analysis.__main__ import main as analysis_main

    missing = tmp_path / "nothing"
    assert analysis_main(["report", str(missing)]) == 2
    line = capsys.readouterr().err.strip().removeprefix("error: ")
    with pytest.raises(api.ConfigError) as err:
        api.load(missing)
    assert str(err.value) == line and "no such directory; give a run, compare or sweep directory" in line
    with pytest.raises(api.ConfigError, match="no metrics.parquet here"):
        api.load(tmp_path)
    stopped = shutil.copytree(twins[2].path, tmp_path / "stopped")
    (stopped / "status.json").write_text(json.dumps({"state": "failed", "rounds_done": 1}))
    with pytest.raises(api.ConfigError, match=r"its run is failed, not complete; continue it with api\.run\(api\.compose"
                                              r"\(resume="):
        api.load(stopped)


# ---- the example notebook ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """docs/tutorials/notebook.ipynb executed on a fresh Jupyter kernel in a folder of its own."""
    import nbclient
    import nbformat

    where = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(where)}}).execute()
    return nb, where


def test_the_example_notebook_runs_and_shows_the_gains_and_two_plots(notebook):
    nb, _ = notebook
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # One progress bar over the 3 schemes x 3 seeds, not a log line per round
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "3 schemes x 3 seeds" in printed and "round 1/3" not in printed, printed[-2000:]
    shown = [o for o in outputs if o.output_type == "execute_result"]
    assert any("gain_low" in o.data.get("text/html", "") for o in shown)  # the gains table, intervals included
    assert sum("image/png" in o.data for o in shown) == 2  # plot_gains(), plot_rounds(): Figures shown as PNGs


def test_load_reads_a_comparison_and_its_runs_and_plots_are_figures(notebook):
    _, where = notebook
    found = api.load(next(where.glob("outputs/*/*")))
    assert isinstance(found, api.Comparison)
    assert list(found.summary["scheme"]) == ["isolated", "fedavg", "fedprox"] and (found.summary["seeds"] == 3).all()
    assert {"gain", "gain_low", "gain_high", "gain_note"} <= set(found.gains.columns)
    assert set(found.gains["scheme"]) == {"fedavg", "fedprox"}
    for plot in (found.plot_gains, found.plot_rounds, found.plot_costs):
        assert isinstance(plot(), Figure)
    one = found.run("fedavg", seed=1)
    assert isinstance(api.load(one.path), api.Run) and set(one.metrics["seed"]) == {1}
    with pytest.raises(api.ConfigError, match="no gain to plot"):  # one run has no isolated baseline to gain over
        one.plot_gains()
    assert (found.report(where / "report") == where / "report" / "report.html") and (where / "report" / "report.html").is_file()
