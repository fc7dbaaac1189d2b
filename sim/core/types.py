"""Shared types: the frozen records that cross module and actor boundaries.

Everything here is plain data (numpy arrays, tuples, frozen dataclasses) so it
pickles cheaply, ships zero-copy through Ray's object store, and can be tested
without a cluster.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import yaml

State = Mapping[str, np.ndarray]
"""Model state that crosses actors: a flat ``name -> array`` mapping, never a pickled module."""

GLOBAL = "global"
"""Institution name used in results for the merged model and the global test set."""
IDLE_ROWS = "idle_rows"
"""Key of the coordinator's ledger row that carries, instead of a row each, the institutions a round simply did not
pick: (their positions among the run's institutions, in scenario order; the round's client-level epsilon or None).
Their rows differ only in the name, so the engine keeps them as a mask per round and builds them as columns at the end
(:class:`sim.core.checkpoint.Progress`); at 10,000 institutions, dicts for them cost more than the round."""



class ConfigError(ValueError):
    """Bad user input, reported as one line naming the config key and the fix."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

    def __reduce__(self):
        # Raised inside a Ray actor (a Krum round that too few updates reached), it must unpickle in the driver as
        # itself, one line naming the key; the default rebuilds it from the message alone and fails.
        return type(self), (self.key, self.problem)


def shown(v: Any, width: int = 60) -> str:
    """A value as a one-line message shows it: numpy scalars and arrays as the plain values a user wrote (``-2.0``,
    never ``np.float64(-2.0)``), strings quoted, long values cut."""
    if isinstance(v, np.generic):
        v = v.item()
    elif isinstance(v, np.ndarray):
        v = v.tolist()
    text = repr(v)
    return text if len(text) <= width else text[:width - 3] + "..."


def listing(items: Any, limit: int = 4) -> str:
    """Every offending item when there are few, else the first ``limit`` and how many more ('a, b, c, d and 7 more')."""
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head} and {len(items) - limit} more"


def spoken(items: Any, limit: int = 4) -> str:
    """Items as a sentence names them: 'a', 'a and b', 'a, b and c', or the first few and how many more."""
    items = [str(i) for i in items]
    if len(items) > limit:
        items = items[: limit - 1] + [f"{len(items) - limit + 1} more"]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


RUN_ARCH = "model"
"""Architecture key of institutions that declare no model of their own: they train the run's ``model``."""


class RunFailed(RuntimeError):
    """A run stopped before its last round (a lost coordinator, an unrecoverable host); ``resume`` continues it."""


@dataclass(frozen=True)
class InstitutionSpec:
    """One institution: who it is, how much data it holds, how skewed, what compute it has."""

    index: int  # position in the scenario; fixes merge order and RNG streams
    name: str
    discipline: str
    share: float  # fraction of the data pool this institution holds (shares sum to 1)
    label_skew: float | None = None  # Dirichlet alpha of its label mix; None = no label skew
    feature_skew: float = 0.0  # std of a per-institution shift added to its inputs
    cpus: float = 1.0  # Ray CPU request of its actor (fractions allowed)
    gpus: float = 0.0  # Ray GPU request of its actor (fractions allowed)
    behaviour: str = "honest"
    bandwidth_mbps: float = 100.0  # link speed used by the simulated clock
    latency_s: float = 0.05  # one-way latency used by the simulated clock
    availability: float = 1.0  # probability of taking part in a round it is selected for (sim/core/faults.py)
    failure_rate: float = 0.0  # probability its local step fails mid-round, so its update never arrives
    speed: float = 1.0  # compute speed factor on top of its cpus/gpus for the simulated clock (0.1: ten times slower)
    dp_noise_multiplier: float = 0.0  # sample-level DP-SGD in its local step (sim.core.dp_sgd): noise std / clip norm; 0 = off
    dp_clip_norm: float = 0.0  # DP-SGD: L2 bound on each sample's gradient
    dp_delta: float = 1e-5  # DP-SGD: the delta its epsilon is reported for
    model: str | None = None  # its own architecture (a conf/model/<name>.yaml, e.g. logreg); null = the run's model

    @property
    def arch(self) -> str:
        """The architecture it trains, as states and hosts key it: its own model's name, or ``model`` (the run's)."""
        return self.model or RUN_ARCH

    @property
    def private(self) -> bool:
        """Whether its local step is DP-SGD (per-sample clipping and Gaussian noise)."""
        return self.dp_noise_multiplier > 0


@dataclass(frozen=True)
class Scenario:
    """Who collaborates: the institutions and the disciplines they come from."""

    name: str
    institutions: tuple[InstitutionSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Institution names in scenario order."""
        return tuple(i.name for i in self.institutions)

    @property
    def disciplines(self) -> tuple[str, ...]:
        """Distinct disciplines in order of first appearance."""
        return tuple(dict.fromkeys(i.discipline for i in self.institutions))


@dataclass(frozen=True)
class Shard:
    """One institution's data: its own train and test split, as numpy arrays."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None  # its validation split (data.val_fraction of its training rows); None = none
    y_val: np.ndarray | None = None

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(len(self.y_train))


@dataclass(frozen=True)
class Federation:
    """All shards of a scenario plus the global test set every scheme is scored on."""

    shards: tuple[Shard, ...]  # in scenario order
    x_test: np.ndarray  # global test set: the union of the institutions' test splits
    y_test: np.ndarray
    input_shape: tuple[int, ...]  # shape of one sample, e.g. (60,) or (1, 8, 8)
    num_classes: int
    x_val: np.ndarray | None = None  # global validation set: the union of the institutions' validation splits
    y_val: np.ndarray | None = None
    x_public: np.ndarray | None = None  # data.public: unlabeled rows no institution trains, validates or tests on


CONFIG = Path(__file__).resolve().parents[2] / "conf" / "config.yaml"
"""The one place the defaults of every top-level key, ``training`` and ``engine`` are declared (with their comments):
the command line composes it, and the dataclasses below read their defaults from it, so a run built in Python gets
exactly what ``python -m sim`` gets."""


@functools.cache
def defaults(section: str) -> dict:
    """The defaults conf/config.yaml gives a section (``training``, ``engine``)."""
    with open(CONFIG) as f:
        return dict(yaml.safe_load(f)[section])


TRAINING_DEFAULTS = defaults("training")


@dataclass(frozen=True)
class TrainingSpec:
    """Local-training hyperparameters shared by every institution (defaults: conf/config.yaml's ``training``)."""

    local_epochs: int = TRAINING_DEFAULTS["local_epochs"]
    batch_size: int = TRAINING_DEFAULTS["batch_size"]
    lr: float = TRAINING_DEFAULTS["lr"]
    momentum: float = TRAINING_DEFAULTS["momentum"]
    weight_decay: float = TRAINING_DEFAULTS["weight_decay"]
    optimizer: str = TRAINING_DEFAULTS["optimizer"]  # sgd | adamw: the local optimizer, built afresh every round
    head_lr: float | None = TRAINING_DEFAULTS["head_lr"]  # a transformer's classification head's lr; None = lr
    precision: str = TRAINING_DEFAULTS["precision"]  # fp32 | bf16 | fp16: autocast dtype of forward passes
    schedule: str = TRAINING_DEFAULTS["schedule"]  # constant | cosine | step: the local lr over rounds (train.lr_scale)
    server_schedule: str = TRAINING_DEFAULTS["server_schedule"]  # the same for a scheme's server_lr
    step_every: int = TRAINING_DEFAULTS["step_every"]  # schedule=step: multiply by step_gamma every step_every rounds
    step_gamma: float = TRAINING_DEFAULTS["step_gamma"]
    rounds: int = 0  # the run's planned rounds (cosine decays over them; set from the top-level rounds); 0 = no decay


@dataclass(frozen=True)
class LocalPlan:
    """What a scheme asks of an institution's round (from ``Scheme.plan``): what every scheme shares, and its own
    client half."""

    start: Literal["global", "personal"] = "global"  # which model local training starts from
    upload: Literal["weights", "gradient", "data", "nothing"] = "weights"
    evaluate: Literal["global", "personal"] = "global"  # which model is scored on test data
    # The scheme's client half (a frozen agents.schemes.base.Client: its extra loss terms, what it keeps at home,
    # how it is scored); None = FedAvg's plain local SGD
    client: Any = None
    # What the update goes through on the institution's host before it leaves, in order: the client halves of the
    # scheme's wrappers (agents/wrappers: compression, secure aggregation's sealing). Each is called as
    # step(institution, ctx, global_state, update) -> update.
    send: tuple[Callable[..., "Update"], ...] = ()


@dataclass(frozen=True)
class RoundContext:
    """What everybody knows at the start of a round."""

    round: int  # 1-based
    seed: int
    cohort: tuple[str, ...]  # institutions that train this round, in scenario order
    plan: LocalPlan = field(default_factory=LocalPlan)
    sim_time: float = 0.0  # simulated seconds elapsed before this round
    dropped: tuple[tuple[str, str], ...] = ()  # (institution, fault) of selected institutions that will send nothing
    server_scale: float = 1.0  # this round's factor on a scheme's server_lr (training.server_schedule)
    slowdown: tuple[tuple[str, float], ...] = ()  # (institution, factor on its speed) of those slowed this round (sim.core.stragglers)
    partial: tuple[tuple[str, int, float], ...] = ()  # (institution, minibatch steps, share of planned) of partial stragglers
    # (institution, simulated seconds its update took: compute + transfer), set by the coordinator before the merge;
    # asynchronous schemes order arrivals on the simulated clock by it
    seconds: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Update:
    """What one institution sends up after local training."""

    institution: str
    index: int
    state: State  # weights, gradients or raw data, per the plan's ``upload``
    num_samples: int  # training samples behind this update
    train_loss: float
    compute_seconds: float  # measured wall time of local training
    bytes_up: int  # bytes that actually cross to the coordinator
    samples_processed: int = 0  # forward+backward passes done (drives the simulated clock)
    bytes_down: int = 0  # bytes of global state this institution received for the round
    start_loss: float = float("nan")  # q-FFL: loss of the received model on its training data; NaN when not asked
    epsilon: float = float("nan")  # DP-SGD: its cumulative epsilon after this round; NaN when it trains without DP


def state_nbytes(state: State) -> int:
    """Bytes a state occupies on the wire (the sum of its arrays)."""
    return int(sum(np.asarray(a).nbytes for a in state.values()))


@dataclass(frozen=True)
class Snapshot:
    """Everything that persists between rounds besides the results: what a checkpoint holds."""

    global_state: State  # the coordinator's global model
    scheme: Mapping[str, np.ndarray]  # the scheme's own state (e.g. the data pool under ``pooled``)
    institutions: Mapping[str, Mapping[str, np.ndarray]]  # name -> persistent state, only those that changed


@dataclass(frozen=True)
class Scores:
    """Many institutions' scores of one round as columns: what a host returns and the engine records.

    At 10,000 institutions a dict (or even a name) per institution costs more than the scoring itself, so scores
    travel as one float array per metric, aligned with ``index`` (the institutions' scenario indices); an institution
    that has no value of a metric (no validation split, say) is False in ``has[metric]`` (a metric every institution
    has needs no entry there). A score that is NaN because the model diverged is present and NaN, so the engine still
    stops on it.
    """

    index: np.ndarray  # int64 scenario indices (InstitutionSpec.index), one per institution
    columns: Mapping[str, np.ndarray]  # metric -> float64 values, one per institution
    has: Mapping[str, np.ndarray] = field(default_factory=dict)  # metric -> bool mask; absent = everybody has it

    @classmethod
    def of(cls, rows: "list[tuple[int, Mapping[str, float]]]") -> "Scores":
        """From ``(scenario index, {metric: value})`` pairs (institutions scored one at a time)."""
        metrics = list(dict.fromkeys(k for _, m in rows for k in m))
        columns, has = {}, {}
        for k in metrics:
            present = np.array([k in m for _, m in rows], dtype=bool)
            columns[k] = np.array([m.get(k, np.nan) for _, m in rows], dtype=np.float64)
            if not present.all():
                has[k] = present
        return cls(np.array([i for i, _ in rows], dtype=np.int64), columns, has)

    def present(self, metric: str) -> np.ndarray:
        """Bool mask of the institutions that have ``metric``."""
        if metric not in self.columns:
            return np.zeros(len(self.index), dtype=bool)
        mask = self.has.get(metric)
        return np.ones(len(self.index), dtype=bool) if mask is None else mask

    def in_scenario_order(self) -> "Scores":
        """These scores sorted by scenario index."""
        order = np.argsort(self.index, kind="stable")
        return Scores(self.index[order], {k: v[order] for k, v in self.columns.items()},
                      {k: v[order] for k, v in self.has.items()})

    @staticmethod
    def concat(parts: "list[Scores]") -> "Scores":
        """One table of several hosts' scores, in the parts' order."""
        if len(parts) == 1:
            return parts[0]
        metrics = list(dict.fromkeys(k for p in parts for k in p.columns))
        n = [len(p.index) for p in parts]
        columns = {k: np.concatenate([p.columns[k] if k in p.columns else np.full(m, np.nan)
                                      for p, m in zip(parts, n)]) for k in metrics}
        has = {k: mask for k in metrics if not (mask := np.concatenate([p.present(k) for p in parts])).all()}
        return Scores(np.concatenate([p.index for p in parts]), columns, has)

    def union(self) -> dict[str, float] | None:
        """The scores of the union of these institutions' test (and validation) sets, pooled from the sums scoring left
        (``test_right``, ``test_rows``, ``test_loss_sum``, and ``val_`` ones; see :class:`agents.host.Host`): with
        everybody scored with one model, the global test set's scores without a second pass over its rows. Accuracy
        is what scoring the union gives, exactly; the loss is summed in float64 (equal to float rounding). None when
        someone's sums are missing (scored on their own, a personal model)."""
        out = {}
        for part, prefix in (("test", ""), ("val", "val_")):
            need = [f"{part}_right", f"{part}_rows", f"{part}_loss_sum"]
            if any(k not in self.columns or k in self.has for k in need):
                return None
            rows = float(self.columns[f"{part}_rows"].sum())
            if rows:
                out[f"{prefix}accuracy"] = float(self.columns[f"{part}_right"].sum()) / rows
                out[f"{prefix}loss"] = float(self.columns[f"{part}_loss_sum"].sum()) / rows
        return out if "accuracy" in out else None

    def rows(self) -> list[tuple[int, dict[str, float]]]:
        """``(scenario index, {metric: value})`` pairs, each with the metrics that institution has."""
        masks = {k: self.present(k) for k in self.columns}
        return [(int(index), {k: float(v[i]) for k, v in self.columns.items() if masks[k][i]})
                for i, index in enumerate(self.index)]
