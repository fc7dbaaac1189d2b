"""FedAsync: merge each update the moment it arrives, mixed in by a weight that shrinks with its staleness.

Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", OPT workshop (NeurIPS) 2020, arXiv:1903.03934,
Algorithm 1. The server keeps x_t; an institution trains from x_tau and returns x_new; on arrival
x_{t+1} = (1 - alpha_t) x_t + alpha_t x_new with alpha_t = alpha * s(t - tau), the staleness function
constant, polynomial s(t - tau) = (t - tau + 1)^-a, or hinge (1 while t - tau <= b, else
1 / (a (t - tau - b) + 1)). One engine round is one such arrival: the earliest on the simulated clock
(:mod:`agents.schemes.asynchronous` keeps the queue), so the global model moves without waiting for
the slowest institution. ``training.server_schedule`` scales alpha like any server learning rate.
"""

from __future__ import annotations

import numpy as np

from agents.schemes.aggregate import server_step
from agents.schemes.asynchronous import Asynchronous, InFlight
from agents.schemes.base import check_range, register
from sim.core.types import State, Update


@register("fedasync")
class FedAsync(Asynchronous):
    """One arrival per round, mixed in with weight alpha * s(staleness)."""

    def __init__(self, *, alpha: float = 0.6, staleness: str = "polynomial", staleness_a: float = 0.5,
                 staleness_b: float = 4.0, concurrency: int = 0):
        super().__init__(concurrency=concurrency, staleness=staleness, staleness_a=staleness_a,
                         staleness_b=staleness_b)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0, low_open=True)

    def payload(self, state: State, update: Update) -> dict[str, np.ndarray]:
        """The weights it sent (x_new)."""
        return {k: np.asarray(v) for k, v in update.state.items()}

    def arrive(self, state: State, update: InFlight, weight: float, lr_scale: float) -> State:
        """x <- (1 - alpha_t) x + alpha_t x_new, alpha_t = alpha * s(t - tau) (times the server schedule's factor)."""
        return server_step(state, update.payload, self.alpha * weight * lr_scale)
