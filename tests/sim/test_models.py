"""Models: every conf/model yaml builds, forwards, round-trips its state and is seeded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sim.core.models import build_model, get_state, model_flops, set_state
from sim.core.types import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
CASES = [("logreg", (60,)), ("mlp", (60,)), ("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("cnn", (3, 5, 7)), ("cnn", (8, 8))]


def load(name: str):
    """The model config as Hydra would compose it."""
    return OmegaConf.load(CONF / f"{name}.yaml")


@pytest.mark.parametrize("name, shape", CASES)
def test_forward_gives_one_logit_per_class(name: str, shape: tuple[int, ...]) -> None:
    # Prepare
    model = build_model(load(name), shape, num_classes=10, seed=0)
    # Execute
    logits = model(torch.zeros((4, *shape)))
    # Assert
    assert logits.shape == (4, 10)


@pytest.mark.parametrize("name, shape", [("logreg", (60,)), ("mlp", (60,)), ("cnn", (1, 8, 8))])
def test_state_round_trip(name: str, shape: tuple[int, ...]) -> None:
    # Prepare: two differently seeded models
    a = build_model(load(name), shape, 10, seed=1)
    b = build_model(load(name), shape, 10, seed=2)
    state = get_state(a)
    # Execute
    set_state(b, state)
    # Assert: same names as state_dict, float32 copies, identical values and outputs
    assert list(state) == list(a.state_dict())
    assert all(v.dtype == np.float32 for v in state.values())
    for k, v in get_state(b).items():
        assert np.array_equal(v, state[k])
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(x), b(x))


def test_get_state_is_a_copy_and_includes_buffers() -> None:
    # Prepare
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    # Execute
    state = get_state(model)
    state["0.weight"][:] = 123.0
    # Assert
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(state)
    assert not torch.any(model[0].weight == 123.0)


def test_set_state_partial_keeps_other_keys() -> None:
    # Prepare
    model = build_model(load("logreg"), (4,), 3, seed=0)
    bias_before = model[1].bias.detach().clone()
    # Execute
    set_state(model, {"1.weight": np.ones((3, 4), np.float32)})
    # Assert
    assert torch.all(model[1].weight == 1.0)
    assert torch.equal(model[1].bias, bias_before)


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    # Prepare
    torch.manual_seed(123)
    before = torch.get_rng_state()
    # Execute
    a = get_state(build_model(load("mlp"), (60,), 10, seed=5))
    b = get_state(build_model(load("mlp"), (60,), 10, seed=5))
    c = get_state(build_model(load("mlp"), (60,), 10, seed=6))
    # Assert
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["1.weight"], c["1.weight"])
    assert torch.equal(torch.get_rng_state(), before)


def test_misspelt_key_raises_config_error_naming_it() -> None:
    # Prepare
    cfg = OmegaConf.merge(load("mlp"), {"hiden": [32]})
    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        build_model(cfg, (60,), 10, seed=0)
    assert err.value.key == "model.hiden"
    assert "hidden" in str(err.value)  # the fix is suggested


def test_cnn_on_tabular_input_raises_config_error() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError):
        build_model(load("cnn"), (60,), 10, seed=0)


def test_model_flops_counts_linear_and_conv_layers() -> None:
    # Prepare
    logreg = build_model(load("logreg"), (60,), 10, seed=0)
    conv = nn.Sequential(nn.Conv2d(1, 2, kernel_size=3, padding=1), nn.Flatten(), nn.Linear(2 * 8 * 8, 10))
    # Execute / Assert: 60*10; conv: 2*8*8 outputs x (1*3*3) MACs each, plus 128*10
    assert model_flops(logreg, (60,)) == 600
    assert model_flops(conv, (1, 8, 8)) == 2 * 64 * 9 + 128 * 10
    assert model_flops(build_model(load("cnn"), (1, 8, 8), 10, 0), (1, 8, 8)) > 0


def test_a_read_only_state_loads_without_torchs_not_writable_warning() -> None:
    # Arrays from Ray's object store are read-only; torch warns about them once per process, so a fresh process
    code = ("import warnings, numpy as np; from torch import nn; from sim.core.models import set_state; "
            "warnings.simplefilter('always'); w = np.ones((3, 4), np.float32); w.flags.writeable = False; "
            "m = nn.Linear(4, 3); set_state(m, {'weight': w}); assert float(m.weight.sum()) == 12.0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not writable" not in done.stderr
