"""q-FFL via q-FedAvg: a merge that weighs institutions with high loss more, for fairer accuracy.

Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020,
Algorithm 2 (q-FedAvg), as the authors' reference code (litian96/fair_flearn, ``qffedavg``)
and Flower's ``QFedAvg`` compute it. Each institution reports F_k, the loss of the
received model w on its own training data before it trains (``LocalPlan.start_loss``),
and its trained weights w_k. With L the Lipschitz estimate:

    Delta_k = L * (w - w_k)
    h_k     = q * F_k^(q-1) * ||Delta_k||^2 + L * F_k^q     (||.||^2 over every floating key)
    w_new   = w - sum_k F_k^q * Delta_k / sum_k h_k

with F_k + 1e-10 in the powers, as the reference code does. L defaults to 1 / training.lr,
the reference code's choice (``1.0 / self.learning_rate``); ``lipschitz`` sets it directly.
q = 0 gives h_k = L, so w_new is the uniform mean of the w_k: FedAvg with
``weighting=uniform``. Larger q tilts the step towards institutions the model serves worst.

Integer buffers (counters) take the uniform mean. Updates without a finite F_k (a
free-rider, which trains nothing and reports no loss; an empty shard) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from agents.schemes.aggregate import server_step, weighted_average
from agents.schemes.base import Client, Work, check_range, register
from agents.schemes.fedavg import FedAvg
from sim.core.train import evaluate
from sim.core.types import LocalPlan, RoundContext, State, TrainingSpec, Update

if TYPE_CHECKING:
    import torch

EPS = 1e-10
"""Added to each loss before its powers, as the reference code does (F_k = 0 with q < 1 would divide by zero)."""


def q_fedavg_step(state: State, trained: Sequence[State], losses: Sequence[float], q: float, lipschitz: float
                  ) -> dict[str, np.ndarray]:
    """One q-FedAvg server step from ``state`` given each institution's trained state and pre-training loss."""
    floating = [k for k in trained[0] if np.issubdtype(np.asarray(state[k]).dtype, np.floating)]
    x = {k: np.asarray(state[k], np.float64) for k in floating}
    numerator = {k: np.zeros_like(v) for k, v in x.items()}
    h_total = 0.0
    for sent, loss in zip(trained, losses):
        f = float(loss) + EPS
        delta = {k: lipschitz * (x[k] - np.asarray(sent[k], np.float64)) for k in floating}
        norm2 = float(sum(np.sum(d * d) for d in delta.values()))
        h_total += q * f ** (q - 1.0) * norm2 + lipschitz * f**q
        for k, d in delta.items():
            numerator[k] += f**q * d
    rest = weighted_average([{k: v for k, v in s.items() if k not in x} for s in trained], [1.0] * len(trained))
    out = server_step(state, rest) if rest else {k: np.asarray(v) for k, v in state.items()}
    for k in floating:
        out[k] = (x[k] - numerator[k] / h_total).astype(np.asarray(state[k]).dtype)
    return out


@register("qffl")
class QFFL(FedAvg):
    """q-FedAvg: institutions report their loss at the received model; the server's step weighs them by loss^q."""

    # q and L from the paper's experiments: q in {0.001 .. 15}; 1 is a moderate tilt towards the worst-served.
    averages = False  # its step weighs institutions by loss^q: no mean to replace
    weighting = "uniform"  # q = 0 is FedAvg's uniform mean

    def __init__(self, *, q: float = 1.0, lipschitz: float | None = None, training_lr: float = 0.05, **fedavg):
        super().__init__(**fedavg)
        self.q = check_range("q", q, 0.0)
        lr = check_range("training_lr", training_lr, 0.0, low_open=True)
        self.lipschitz = 1.0 / lr if lipschitz is None else check_range("lipschitz", lipschitz, 0.0, low_open=True)

    def plan(self, round: int) -> LocalPlan:
        """Plain local SGD from the global model, after scoring it on the own training data."""
        return LocalPlan(client=StartLossClient())

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """The q-FedAvg step over the updates with a finite reported loss; None if there are none."""
        usable = [u for u in updates if u.state and np.isfinite(u.start_loss)]
        if not usable:
            return None
        return q_fedavg_step(state, [u.state for u in usable], [u.start_loss for u in usable], self.q, self.lipschitz)


@dataclass(frozen=True)
class StartLossClient(Client):
    """q-FFL's client half: F_k, the received model's loss on the own training data, measured before the local step."""

    batchable = False  # it scores the received model first

    def local_step(self, inst: Any, model: torch.nn.Module, start: State, training: TrainingSpec, key: tuple[int, ...],
                   cap: int | None) -> Work:
        """FedAvg's local step, after measuring F_k (reported as the update's ``start_loss``)."""
        loss = evaluate(model, inst.shard.x_train, inst.shard.y_train, precision=inst.training.precision)[1]
        work = super().local_step(inst, model, start, training, key, cap)
        work.start_loss = loss
        return work
