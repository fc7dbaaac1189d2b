"""SCAFFOLD: FedAvg whose local steps are corrected by control variates against client drift.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020, Algorithm 1 with option II. The server keeps a control
c, each institution its own c_i (both start at zero). A local step follows g - c_i + c;
after K local steps at rate lr the institution sets c_i+ = c_i - c + (x - y_i) / (K * lr)
and sends y_i and c_i+ - c_i. The server moves x += server_lr * mean(y_i - x) and
c += (|S| / N) * mean(c_i+ - c_i) = (1 / N) * sum(c_i+ - c_i) over the updates that arrived,
so c stays the mean of all N institutions' c_i.

How c and c_i travel, and where they live:

- c is this scheme's state (:meth:`state` / :meth:`load_state`, so checkpoints keep it).
  It reaches institutions in the round's client half (:class:`ScaffoldClient`, a flat ``name -> array``
  mapping over trainable parameters, float32), not inside the global state: the global
  state stays exactly the model, so the coordinator, evaluation and every model loader
  read it unchanged. Institutions book c's bytes in ``bytes_down``; members that received
  it and then failed are booked by :meth:`cost`.
- c_i is the institution's persistent state (``control/<key>`` in ``Institution.persistent``),
  checkpointed and given back to a restarted host like Ditto's personal model.
- The upload is the weights y_i (the server knows x, so y_i and y_i - x carry the same
  information and bytes) plus c_i+ - c_i under ``control_change/<key>``: twice the trainable
  model, which ``bytes_up`` counts. A free-rider sends no change (its c_i stays put).

Local steps of plain SGD are what option II assumes: with momentum, weight decay or a
learning-rate schedule the (x - y_i) / (K * lr) estimate is the paper's, with lr the
round's scheduled rate. The vectorised local step does not run SCAFFOLD (``batchable``). The
client half (:class:`ScaffoldClient`) adds the correction to the local objective (a
:class:`~sim.core.objective.Shift`) and, after the step, updates c_i and appends its change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from agents.schemes.aggregate import weighted_average
from agents.schemes.base import Client, Cost, Work, register
from agents.schemes.fedavg import FedAvg
from sim.core.faults import FAILED
from sim.core.objective import Shift, Term
from sim.core.types import LocalPlan, RoundContext, State, TrainingSpec, Update, state_nbytes

if TYPE_CHECKING:
    import torch

CHANGE = "control_change/"
"""Key prefix of an institution's c_i+ - c_i in its upload."""


def split_upload(sent: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(model weights, control change) of one SCAFFOLD upload."""
    model = {k: np.asarray(v) for k, v in sent.items() if not k.startswith(CHANGE)}
    change = {k.removeprefix(CHANGE): np.asarray(v) for k, v in sent.items() if k.startswith(CHANGE)}
    return model, change


def control_step(control: State, changes: Sequence[State], institutions: int) -> dict[str, np.ndarray]:
    """c + (1 / N) * sum of the changes (float64 sums, float32 result): the paper's c += (|S|/N) * mean(dc)."""
    keys = sorted({k for c in changes for k in c} | set(control))
    out = {}
    for k in keys:
        total = sum((np.asarray(c[k], np.float64) for c in changes if k in c), np.zeros(()))
        base = np.asarray(control[k], np.float64) if k in control else np.zeros(np.shape(total))
        out[k] = (base + total / institutions).astype(np.float32)
    return out


@register("scaffold")
class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's control variates: server control c (kept here), institution controls c_i (kept there)."""

    averages = False  # its merge also moves the server control: a robust rule or masked sum cannot stand in for it
    weighting = "uniform"  # the paper's mean(y_i - x)

    def __init__(self, **fedavg):
        super().__init__(**fedavg)
        self.c: dict[str, np.ndarray] = {}
        self.population = 0  # N, all institutions: learnt in select, which runs before every merge
        self.sent = 0  # bytes of the c sent with this round's plan

    def plan(self, round: int) -> LocalPlan:
        """Local SGD corrected by c - c_i; upload the weights and the change of c_i."""
        self.sent = state_nbytes(self.c)
        return replace(super().plan(round), client=ScaffoldClient(dict(self.c)))

    def select(self, ctx: RoundContext) -> tuple[str, ...]:
        """FedAvg's cohort; remember how many institutions there are (N in the control step)."""
        self.population = len(ctx.cohort)
        return super().select(ctx)

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """x += server_lr * mean(y_i - x); c += sum(dc_i) / N. None (and c kept) if nothing usable arrived."""
        usable = self.usable(updates)
        if not usable:
            return None
        parts = [split_upload(u.state) for u in usable]
        target = weighted_average([m for m, _ in parts], self.weights(usable))
        self.c = control_step(self.c, [c for _, c in parts], max(self.population, len(usable)))
        return self.step_to(ctx, state, target)

    def cost(self, ctx: RoundContext, updates: Sequence[Update]) -> Cost:
        """c's bytes for members that received this round's plan but sent nothing back (failed, crashed, timed out)."""
        arrived = {u.institution for u in updates}
        received = (set(ctx.cohort) - arrived) | {name for name, fault in ctx.dropped if fault == FAILED}
        return Cost(extras={name: {"bytes_down": self.sent} for name in sorted(received)} if self.sent else {})

    def state(self) -> dict[str, np.ndarray]:
        """The server control c, for checkpoints."""
        return {f"c/{k}": v for k, v in self.c.items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue with a checkpoint's server control."""
        self.c = {k.removeprefix("c/"): np.asarray(v, np.float32) for k, v in arrays.items() if k.startswith("c/")}


@dataclass(frozen=True)
class ScaffoldClient(Client):
    """SCAFFOLD's client half: local steps follow g - c_i + c; afterwards c_i moves and its change is uploaded."""

    batchable = False  # it corrects gradients and updates the institution's control variate

    c: State = field(default_factory=dict, compare=False)  # the server control (name -> float32 array; {} = zeros)

    def terms(self, inst: Any, model: torch.nn.Module, start: State) -> tuple[Term, ...]:
        """The correction c - c_i over the trainable parameters (a missing variate is zero), as a linear term."""
        out = {}
        for k, p in model.named_parameters():
            if p.requires_grad and (k in self.c or k in inst.control):
                zero = np.zeros(tuple(p.shape), np.float32)
                out[k] = np.asarray(self.c.get(k, zero), np.float32) - np.asarray(inst.control.get(k, zero), np.float32)
        return (Shift(out),)

    def finish(self, inst: Any, start: State, payload: dict[str, np.ndarray], work: Work,
               training: TrainingSpec) -> dict[str, np.ndarray]:
        """Option II: c_i+ = c_i - c + (x - y_i) / (K * lr) over the sent floating keys; the upload gains c_i+ - c_i.

        ``x`` is the received model, ``y_i`` what is sent (after any behaviour), ``K`` the local steps taken.
        No steps (an empty shard) leaves c_i as it is.
        """
        if work.steps <= 0:
            return {**payload}
        change = {}
        for k, y in payload.items():
            y = np.asarray(y)
            if not np.issubdtype(y.dtype, np.floating) or k not in start:
                continue
            drift = (np.asarray(start[k], np.float64) - y.astype(np.float64)) / (work.steps * training.lr)
            c = np.asarray(self.c.get(k, 0.0), np.float64)
            old = np.asarray(inst.control.get(k, np.zeros_like(y)), np.float32)
            new = (old.astype(np.float64) - c + drift).astype(np.float32)
            change[k], inst.control[k] = new - old, new
        inst.changed = True
        return {**payload, **{CHANGE + k: v for k, v in change.items()}}

    def bytes_down(self, plan: LocalPlan, global_state: State | None, kept: Sequence[str] = ()) -> int:
        """The global model and c beside it."""
        return super().bytes_down(plan, global_state, kept) + (state_nbytes(self.c) if plan.start == "global" else 0)
