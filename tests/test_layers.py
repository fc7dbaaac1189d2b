"""The layers run one way: pyproject.toml's import contracts hold, and they name every module of sim's top layer."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest
from importlinter import configuration
from importlinter.application import use_cases

import sim

PYPROJECT = str(Path(__file__).resolve().parent.parent / "pyproject.toml")


@pytest.fixture(scope="module")
def contracts() -> dict[str, dict]:
    """The import contracts of pyproject.toml, by id, as import-linter reads them."""
    configuration.configure()
    return {c["id"]: c for c in use_cases.read_user_options(PYPROJECT).contracts_options}


def test_the_import_contracts_hold(contracts, capsys) -> None:
    # Execute: import-linter over sim, agents and analysis; grimp reads every import, function-level ones included
    kept = use_cases.lint_imports(PYPROJECT, cache_dir=None, no_logo=True)
    # Assert: every contract kept (its report, printed, names the importer and the imported of a broken one)
    assert kept, capsys.readouterr().out


def test_the_contracts_name_every_top_module_of_sim(contracts) -> None:
    # Prepare: sim's direct children other than the bottom layer: the commands and orchestration
    top = {f"sim.{m.name}" for m in pkgutil.iter_modules(sim.__path__) if m.name != "core"}
    assert {"sim.engine", "sim.compare", "sim.checks"} <= top
    # Assert: a new top module is forbidden to the lower layers as soon as it exists, and may not import Ray
    for id_ in ("core", "domain", "analysis"):
        missing = top - set(contracts[id_]["forbidden_modules"])
        assert not missing, f"pyproject.toml, contract {id_}: add {sorted(missing)} to forbidden_modules"
    missing = top - {"sim.sweep"} - set(contracts["ray"]["source_modules"])  # the Tune entry drives Ray Tune
    assert not missing, f"pyproject.toml, contract ray: add {sorted(missing)} to source_modules"


def test_the_contracts_name_every_domain_module_outside_the_runtime(contracts) -> None:
    import agents

    # Prepare: agents' direct children other than its runtime: institutions, coordinator, schemes, ...
    domain = {f"agents.{m.name}" for m in pkgutil.iter_modules(agents.__path__) if m.name != "runtime"}
    # Assert: none of them may import the runtime or Ray
    for id_, key in (("runtime", "source_modules"), ("ray", "source_modules")):
        missing = domain - set(contracts[id_][key])
        assert not missing, f"pyproject.toml, contract {id_}: add {sorted(missing)} to {key}"
