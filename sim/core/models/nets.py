"""Small torch networks for tabular and image shards, built by Hydra from ``conf/model/``.

Every factory takes ``input_shape`` (one sample, e.g. ``(60,)`` or ``(1, 8, 8)``) and
``num_classes`` from the engine, plus its own hyperparameters from the yaml, and returns
a plain ``torch.nn.Module`` that maps a batch to class logits.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from sim.core.types import ConfigError


def _flat_size(input_shape: Sequence[int]) -> int:
    """Number of features in one flattened sample."""
    return int(math.prod(int(d) for d in input_shape))


def logreg(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(input_shape), int(num_classes)))


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64,)) -> nn.Module:
    """Multilayer perceptron on the flattened input: Linear+ReLU per hidden width, then a linear head."""
    widths = [int(h) for h in hidden]
    if any(h < 1 for h in widths):
        raise ConfigError("model.hidden", f"hidden widths must be positive, got {widths}")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = _flat_size(input_shape)
    for width in widths:
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, int(num_classes)))
    return nn.Sequential(*layers)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
) -> nn.Module:
    """Small conv net: per entry of ``channels`` a 3x3 conv + ReLU (+ 2x2 max-pool while the image is >= 2 px), then an MLP head.

    Sized for 8x8 digits but accepts any (C, H, W) input; an (H, W) input is read as one channel.
    """
    shape = tuple(int(d) for d in input_shape)
    layers: list[nn.Module] = []
    if len(shape) == 2:
        layers.append(nn.Unflatten(1, (1, shape[0])))  # (N, H, W) -> (N, 1, H, W)
        shape = (1, *shape)
    if len(shape) != 3:
        raise ConfigError("model", f"cnn needs image input (C, H, W), got shape {shape}; use model=mlp for tabular data")
    c, h, w = shape
    for out in (int(k) for k in channels):
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        if h >= 2 and w >= 2:  # pool only while there is something left to pool
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.Flatten(), nn.Linear(c * h * w, int(hidden)), nn.ReLU(), nn.Linear(int(hidden), int(num_classes))]
    return nn.Sequential(*layers)
