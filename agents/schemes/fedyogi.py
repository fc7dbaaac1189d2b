"""FedYogi: FedAdam with Yogi's additive second moment.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2); Yogi from Zaheer et al., NeurIPS 2018. v moves
towards delta^2 by a step of (1 - beta2) * delta^2 rather than geometrically, so it grows
and shrinks more slowly than Adam's when updates change size between rounds.
"""

from __future__ import annotations

from agents.schemes.base import register
from agents.schemes.fedadam import FedAdam
from agents.schemes.server_optimisers import Yogi


@register("fedyogi")
class FedYogi(FedAdam):
    """FedAdam whose second moment follows Yogi: v = v - (1 - beta2) * delta^2 * sign(v - delta^2)."""

    adaptive = Yogi
