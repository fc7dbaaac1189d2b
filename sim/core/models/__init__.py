"""Models: Hydra-built factories, seeded construction, and the numpy state that crosses actors.

``conf/model/<name>.yaml`` names a factory (``_target_: sim.core.models.<factory>``) and its
hyperparameters; :func:`build_model` instantiates it with the federation's input shape
and class count under a seeded, forked torch RNG so every institution and the
coordinator start from the same weights without touching global RNG state.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Any, Mapping, Sequence

import hydra.utils
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sim.core.models.nets import cnn, logreg, mlp
from sim.core.types import ConfigError, State

__all__ = ["build_model", "cnn", "fits", "get_state", "logreg", "mlp", "model_flops", "set_state"]

_HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}


def _check_keys(cfg: Mapping[str, Any]) -> None:
    """Fail with one line naming the model key when the yaml does not fit its factory."""
    target = cfg.get("_target_")
    if not target:
        raise ConfigError("model._target_", "missing; set it to a factory such as sim.core.models.mlp")
    try:
        factory = hydra.utils.get_object(str(target))
    except Exception as err:  # hydra raises its own ImportError flavours
        raise ConfigError("model._target_", f"cannot import {target!r} ({err}); check the spelling") from None
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = set(params) - {"input_shape", "num_classes"}
    for key in cfg:
        if key in _HYDRA_KEYS:
            continue
        if key in ("input_shape", "num_classes"):
            raise ConfigError(f"model.{key}", "is set by the engine from the data; remove it from the model config")
        if key not in allowed:
            near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            fix = f"did you mean model.{near[0]}?" if near else f"valid keys: {', '.join(sorted(allowed)) or 'none'}"
            raise ConfigError(f"model.{key}", f"unknown key for {target}; {fix}")


def build_model(model_cfg: Mapping[str, Any], input_shape: Sequence[int], num_classes: int, seed: int) -> nn.Module:
    """Instantiate the configured model with weights drawn from ``seed``; global torch RNG state is left untouched."""
    cfg = model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(dict(model_cfg))
    _check_keys(cfg)
    with torch.random.fork_rng(devices=[]):  # CPU init only; GPU RNG is never touched
        torch.manual_seed(int(seed))
        try:
            model = hydra.utils.instantiate(cfg, input_shape=tuple(int(d) for d in input_shape), num_classes=int(num_classes))
        except ConfigError:
            raise
        except Exception as err:
            cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
            if cause is not None:
                raise cause from None
            raise ConfigError("model", f"could not build {cfg.get('_target_')}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model._target_", f"{cfg.get('_target_')} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def get_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy of the model's trainable state as numpy, named by ``state_dict`` keys: what crosses actors.

    Every parameter and buffer, except the keys a model lists in its ``frozen_keys``
    attribute: a pretrained transformer (:mod:`sim.core.models.foundation`) names its frozen
    base there, so only LoRA adapters and the head cross (all of it with adapter=none).
    Small nets have no ``frozen_keys`` and give their whole ``state_dict``.
    Floating tensors become float32 (what crosses actors and is counted on the wire);
    integer buffers such as BatchNorm's ``num_batches_tracked`` keep their dtype.
    """
    frozen = getattr(model, "frozen_keys", frozenset())
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if name in frozen:
            continue
        t = tensor.detach().cpu()
        out[name] = t.float().numpy().copy() if t.is_floating_point() else t.numpy().copy()
    return out


def check_state_keys(own: Mapping[str, Any], state: State, whose: str = "") -> None:
    """KeyError when ``state`` names keys the model's ``own`` state_dict lacks (what set_state refuses)."""
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"state has keys the model does not: {unknown[:5]}" + (f" ({whose})" if whose else ""))


def fits(model: nn.Module, state: State) -> bool:
    """Whether ``state`` names only keys of ``model``'s state_dict (it is a state of this architecture)."""
    own = model.state_dict()
    return all(k in own for k in state)


def set_state(model: nn.Module, state: State) -> None:
    """Load (part of) a state into ``model`` in place; keys absent from ``state`` keep their value."""
    own = model.state_dict()
    check_state_keys(own, state)
    with torch.no_grad():
        for name, array in state.items():
            target = own[name]
            value = _readable(np.asarray(array))
            if value.shape != target.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}")
            target.copy_(value.to(dtype=target.dtype, device=target.device))


def _readable(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array`` to read from. Arrays from Ray's object store are read-only, and torch warns that
    writing to such a tensor is undefined; the caller only copies out of it, so that warning is kept off."""
    if array.flags.writeable:
        return torch.as_tensor(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array)


def model_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Approximate forward multiply-adds per sample, counted over Linear and Conv2d layers (for the simulated clock).

    A Linear counts ``in_features`` per output value, so one applied to every token of a
    transformer counts once per token (attention's own products are left out). Models
    that take token ids say so with ``input_dtype = torch.int64``; they are probed with
    ids free of padding (``pad_id + 1``) so no position is masked. Every layer counts, also where a text model
    stores its frozen layers' outputs (whether the probe's are stored already depends on what the process ran before).
    """
    total = 0

    def count(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * int(output[0].numel())  # output[0]: one sample's outputs, all its tokens
        elif isinstance(module, nn.Conv2d):
            per_output = (module.in_channels // module.groups) * int(np.prod(module.kernel_size))
            total += per_output * int(output[0].numel())  # output[0]: one sample's output map

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = getattr(model, "input_dtype", None) or (first.dtype if first is not None else torch.float32)
    shape = (1, *(int(d) for d in input_shape))
    probe = torch.zeros(shape, device=device, dtype=dtype)
    if not (dtype.is_floating_point or dtype.is_complex):
        probe += int(getattr(model, "pad_id", -1)) + 1  # any id but the pad id
    was_training = model.training
    prefix = getattr(model, "prefix", None)  # stored frozen-layer states (a text model): count every layer, always
    try:
        model.eval()  # no BatchNorm statistics updated, no dropout
        if prefix is not None:
            model.prefix = None
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        if prefix is not None:
            model.prefix = prefix
    return int(total)
