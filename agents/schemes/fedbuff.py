"""FedBuff: buffer K changes as they arrive, then step the global model by their staleness-weighted mean.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022, Algorithm 1. An institution trains from x_tau and sends its change
Delta = y - x_tau; on arrival the server adds s(t - tau) * Delta to a buffer (and the institution
starts again from the model as it stands), and once K changes are in it steps
x_{t+1} = x_t + server_lr * (sum of the K weighted changes) / K and empties the buffer, with
s(t - tau) = 1 / sqrt(1 + t - tau) (polynomial staleness with a = 0.5, the default here). One engine
round is one arrival, the earliest on the simulated clock (:mod:`agents.schemes.asynchronous` keeps
the queue); the model moves every K rounds. Changes are kept on floating-point keys; integer buffers
stay at their global value. The buffer is saved in checkpoints.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from agents.schemes.aggregate import _cast
from agents.schemes.asynchronous import Asynchronous, InFlight
from agents.schemes.base import check_range, register
from agents.schemes.privacy import delta
from sim.core.types import ConfigError, State, Update


@register("fedbuff")
class FedBuff(Asynchronous):
    """Buffer each arrival's staleness-weighted change; every K arrivals apply their sum / K with server_lr."""

    def __init__(self, *, buffer_size: int = 3, server_lr: float = 1.0, staleness: str = "polynomial",
                 staleness_a: float = 0.5, staleness_b: float = 4.0, concurrency: int = 0):
        super().__init__(concurrency=concurrency, staleness=staleness, staleness_a=staleness_a, staleness_b=staleness_b)
        self.buffer_size = int(check_range("buffer_size", buffer_size, 1.0))
        self.server_lr = check_range("server_lr", server_lr, 0.0, low_open=True)
        self.buffer: dict[str, np.ndarray] = {}  # sum of s_i * Delta_i (float64) since the last step
        self.buffered = 0

    def fits(self, institutions: int) -> None:
        """Refuse a buffer larger than the institutions training at once (it would hold one's changes twice)."""
        super().fits(institutions)
        if self.buffer_size > self.slots(institutions):
            raise ConfigError("scheme.buffer_size", f"a buffer of {self.buffer_size} is more than the "
                              f"{self.slots(institutions)} of {institutions} institutions that train at once; lower "
                              "scheme.buffer_size or raise scheme.concurrency (0 = all)")

    def payload(self, state: State, update: Update) -> dict[str, np.ndarray]:
        """Its change to the model it trained from (float64, floating-point keys)."""
        return delta(state, update.state)

    def arrive(self, state: State, update: InFlight, weight: float, lr_scale: float) -> State | None:
        """Add s * Delta to the buffer; at K: x <- x + server_lr * buffer / K (times the server schedule's factor)."""
        for key, change in update.payload.items():
            self.buffer[key] = self.buffer.get(key, 0.0) + weight * change
        self.buffered += 1
        if self.buffered < self.buffer_size:
            return None
        out, step = dict(state), self.server_lr * lr_scale / self.buffer_size
        for key, total in self.buffer.items():
            old = np.asarray(state[key])
            out[key] = _cast(old.astype(np.float64) + step * total, old.dtype)
        self.buffer, self.buffered = {}, 0
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The queue (see :class:`Asynchronous`) and the buffer."""
        return super().state() | {"meta/buffered": np.array(self.buffered, np.int64)} | {
            f"buffer/{k}": v for k, v in self.buffer.items()}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Continue with a checkpoint's queue and buffer."""
        super().load_state(arrays)
        if arrays:
            self.buffered = int(arrays["meta/buffered"])
            self.buffer = {k.partition("/")[2]: np.asarray(v, np.float64) for k, v in arrays.items()
                           if k.startswith("buffer/")}
