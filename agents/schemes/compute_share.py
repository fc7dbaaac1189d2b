"""Compute sharing: FedAvg where institutions without enough compute hand their local training to a partner.

FedAvg (McMahan et al., AISTATS 2017) assumes every institution trains its own shard on
its own hardware, so a consortium waits each round for its slowest member. Under compute
sharing (算力共享) data stays at home except that of institutions too slow to keep up:
before round 1 a broker (:mod:`agents.schemes.broker`, deterministic, by simulated speed)
names them *takers* and gives each a *giver* with spare capacity. The taker's raw training
data crosses to its giver once, and from then on the giver trains it every round, one shard
after another on its own compute.

The numbers of training do not change: a taker's update is computed from its own data with
its own RNG stream exactly as under ``fedavg``, and merged as FedAvg merges (every key of
``fedavg`` and every wrapper FedAvg takes works here). What changes is the ledger and the simulated clock (:meth:`book`):

- the giver's row: ``sim_compute_seconds`` and ``compute_given_seconds`` gain the taker's
  training at the giver's rate, and its ``simulated_seconds`` covers the data arriving (the
  round it moves), its own training and all its takers' one after another;
- the taker's row: ``trained_by`` names the giver, ``compute_taken_seconds`` is what the
  giver spent on it, its own ``sim_compute_seconds`` is 0 (its hardware idles), ``data_bytes``
  counts the raw data sent to the giver (the round it moves), and its update is ready when
  the giver's batch ends; it still exchanges the model with the coordinator itself, so the
  model bytes stay on its row;
- ``solo_seconds`` keeps what each row would have taken without sharing, so a round's
  makespan can be compared with and without it (analysis/compute.py).

A giver trains its takers while it is in the round or idle (not selected); a giver that is
offline or fails leaves its takers to train at home that round. Whose data has moved is the
scheme's state, kept in checkpoints, so a resumed run books the move only once.
"""

from __future__ import annotations

from typing import ClassVar, Any, Sequence

import numpy as np

from agents.schemes import broker
from agents.schemes.base import check_range, register
from agents.schemes.fedavg import FedAvg
from sim.core import clock, faults
from sim.core.types import ConfigError, InstitutionSpec, RoundContext

AVAILABLE = (faults.OK, faults.IDLE)
"""Statuses of a giver whose compute is there for its takers this round."""


@register("compute_share")
class ComputeShare(FedAvg):
    """FedAvg whose slow institutions have a partner with spare compute train their data (ledger and clock only)."""

    books_idle: ClassVar[bool] = True  # a giver outside the cohort still lends its compute: book() changes its row

    def __init__(self, *, slow_factor: float = 1.25, reference: str = "median", **fedavg):
        super().__init__(**fedavg)
        self.slow_factor = check_range("slow_factor", slow_factor, 1.0)
        if reference not in broker.REFERENCES:
            raise ConfigError("scheme.reference", f"unknown reference {reference!r}; use one of "
                              f"{', '.join(broker.REFERENCES)}")
        self.reference = reference
        self.specs: dict[str, InstitutionSpec] = {}
        self.partner: dict[str, str] = {}  # taker -> giver, from the broker
        self.row_bytes = 0
        self.moved: set[int] = set()  # scenario indices of takers whose data is at their giver already

    def check(self, specs: Sequence[InstitutionSpec]) -> None:
        """Refuse a scenario where nobody is slow enough, or nobody has spare capacity (see :func:`broker.check`)."""
        broker.check(specs, self.slow_factor, self.reference)

    def attach(self, specs: Sequence[InstitutionSpec], *, row_bytes: int) -> None:
        """Make the broker's plan for this run's institutions (a coalition may have no taker: nothing is shared)."""
        self.specs = {s.name: s for s in specs}
        self.partner = dict(broker.plan(tuple(specs), self.slow_factor, self.reference).partner)
        self.row_bytes = int(row_bytes)

    def book(self, ctx: RoundContext, rows: list[dict[str, Any]]) -> None:
        """Move each served taker's training to its giver's row and clock (the module docstring says how)."""
        by = {row["institution"]: row for row in rows}
        batches: dict[str, list[dict[str, Any]]] = {}
        for taker, giver in self.partner.items():
            k, g = by.get(taker), by.get(giver)
            if k is not None and g is not None and k["participated"] and g["status"] in AVAILABLE:
                batches.setdefault(giver, []).append(k)
        for giver in sorted(batches, key=lambda n: self.specs[n].index):
            g, gs = by[giver], self.specs[giver]
            arriving, given = 0.0, 0.0
            for k in sorted(batches[giver], key=lambda r: self.specs[r["institution"]].index):
                ks = self.specs[k["institution"]]
                taken = k["sim_compute_seconds"] * clock.flops_rate(ks) / clock.flops_rate(gs)
                nbytes = 0 if ks.index in self.moved else int(k["samples"]) * self.row_bytes
                self.moved.add(ks.index)
                arriving += handover_seconds(ks, gs, nbytes)
                given += taken
                k.update(trained_by=giver, compute_taken_seconds=taken, data_bytes=nbytes,
                         solo_seconds=k["simulated_seconds"])
            finish = arriving + g["sim_compute_seconds"] + given  # data in, then own training, then the takers'
            g.update(solo_seconds=g["simulated_seconds"], compute_given_seconds=given,
                     sim_compute_seconds=g["sim_compute_seconds"] + given,
                     simulated_seconds=g["simulated_seconds"] + arriving + given)
            for k in batches[giver]:  # ready when the giver's batch ends, then its own model exchange
                k["simulated_seconds"] = finish + (k["simulated_seconds"] - k["sim_compute_seconds"])
                k["sim_compute_seconds"] = 0.0

    def state(self) -> dict[str, np.ndarray]:
        """Whose data has moved to its giver (scenario indices), so a resumed run does not book the move again."""
        return {**super().state(), "moved": np.asarray(sorted(self.moved), dtype=np.int64)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state`."""
        super().load_state({k: v for k, v in arrays.items() if k != "moved"})
        self.moved = {int(i) for i in np.asarray(arrays.get("moved", ()))}


def handover_seconds(taker: InstitutionSpec, giver: InstitutionSpec, nbytes: int) -> float:
    """Seconds for a taker's raw data to reach its giver: the slower of the two links, plus both latencies."""
    if nbytes == 0:
        return 0.0
    return nbytes * 8 / (min(taker.bandwidth_mbps, giver.bandwidth_mbps) * 1e6) + taker.latency_s + giver.latency_s
