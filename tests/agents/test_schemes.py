"""Scheme behaviour: plan / select / merge of every scheme, the registry and its yaml files.

Known answers use small exactly-representable numbers; ``rtol=1e-6`` covers one float32
rounding of the float64 result.
"""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from agents.schemes import SCHEMES, sample_cohort
from agents.schemes.fedavg import FedAvg
from agents.schemes.fedprox import FedProx
from agents.schemes.fedsgd import FedSGD
from agents.schemes.isolated import Isolated
from agents.schemes.pooled import POOLED_STREAM, Pooled
from sim.core.types import ConfigError, LocalPlan, RoundContext, Update

CONF = Path(__file__).resolve().parents[2] / "conf" / "scheme"
MINE = ("isolated", "pooled", "fedavg", "fedprox", "fedsgd")
F32_RTOL = 1e-6
NAMES = tuple(f"inst{i}" for i in range(10))


def ctx(round: int = 1, seed: int = 0, cohort: tuple[str, ...] = NAMES) -> RoundContext:
    """A round context over ``cohort``."""
    return RoundContext(round=round, seed=seed, cohort=cohort)


def update(index: int, state: dict, num_samples: int) -> Update:
    """An update from institution ``index``."""
    return Update(
        institution=NAMES[index], index=index, state=state, num_samples=num_samples,
        train_loss=0.0, compute_seconds=0.0, bytes_up=0,
    )


GLOBAL = {"w": np.array([0.0, 0.0], np.float32)}
UPDATES = [update(0, {"w": np.array([1.0, 2.0], np.float32)}, 1), update(1, {"w": np.array([3.0, 4.0], np.float32)}, 3)]


# --- registry and yaml ---------------------------------------------------------------


def test_registry_names_equal_yaml_file_names() -> None:
    # Prepare
    yaml_names = {p.stem for p in CONF.glob("*.yaml")}
    # Assert: every registered scheme has a yaml and every yaml a scheme
    assert set(MINE) <= set(SCHEMES)
    assert set(SCHEMES) == yaml_names


@pytest.mark.parametrize("name", MINE)
def test_yaml_target_instantiates_the_registered_class(name: str) -> None:
    # Prepare
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    # Execute
    scheme = hydra.utils.instantiate(cfg)
    # Assert
    assert type(scheme) is SCHEMES[name]
    assert type(scheme).name == name
    assert cfg.cohort_fraction == 1.0


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: FedAvg(weighting="median"), "scheme.weighting"),
        (lambda: FedAvg(server_lr=0.0), "scheme.server_lr"),
        (lambda: FedSGD(cohort_fraction=1.5), "scheme.cohort_fraction"),
        (lambda: Isolated(cohort_fraction=0.0), "scheme.cohort_fraction"),
        (lambda: FedProx(mu=-1.0), "scheme.mu"),
    ],
)
def test_bad_arguments_name_their_key(make, key: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == key


# --- cohort sampling -----------------------------------------------------------------


@pytest.mark.parametrize("scheme_cls", [Isolated, FedAvg, FedProx, FedSGD])
def test_cohort_fraction_count_order_and_determinism(scheme_cls) -> None:
    # Prepare
    scheme = scheme_cls(cohort_fraction=0.3)
    # Execute
    picks = [scheme.select(ctx(round=r, seed=7)) for r in range(1, 6)]
    again = [scheme.select(ctx(round=r, seed=7)) for r in range(1, 6)]
    # Assert: ceil(0.3 * 10) = 3, in scenario order, same per (seed, round), varies over rounds
    assert all(len(p) == 3 for p in picks)
    assert all(list(p) == sorted(p, key=NAMES.index) for p in picks)
    assert picks == again
    assert len(set(picks)) > 1
    assert scheme.select(ctx(round=1, seed=8)) == sample_cohort(ctx(round=1, seed=8), 0.3)


def test_full_cohort_fraction_selects_everybody() -> None:
    # Execute / Assert
    assert FedAvg().select(ctx()) == NAMES


# --- isolated ------------------------------------------------------------------------


def test_isolated_trains_personal_models_and_never_merges() -> None:
    # Prepare
    scheme = Isolated()
    # Execute
    plan = scheme.plan(3)
    merged = scheme.merge(ctx(), GLOBAL, UPDATES)
    # Assert
    assert plan == LocalPlan(start="personal", upload="nothing", evaluate="personal")
    assert merged is None


# --- pooled --------------------------------------------------------------------------


class RecordingTrainer:
    """A central trainer that records its calls and returns a marked state."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, state, x, y, key, parts=None):
        self.calls.append((x.copy(), y.copy(), key, parts))
        return {"w": np.asarray(state["w"]) + 1.0}, 0.5


def test_pooled_concatenates_in_scenario_order_and_trains_centrally() -> None:
    # Prepare
    scheme, trainer = Pooled(), RecordingTrainer()
    scheme.bind(trainer)
    data = [update(i, {"x": np.full((n, 2), i, np.float32), "y": np.full(n, i, np.int64)}, n) for i, n in enumerate((2, 1, 3))]
    # Execute: round 1 receives data, round 2 receives nothing
    first = scheme.merge(ctx(round=1, seed=4), GLOBAL, data)
    second = scheme.merge(ctx(round=2, seed=4), first, [])
    # Assert
    assert scheme.plan(1).upload == "data"
    assert len(trainer.calls) == 2
    x, y, key, parts = trainer.calls[0]
    np.testing.assert_array_equal(y, [0, 0, 1, 2, 2, 2])
    assert parts == ((0, 2), (1, 1), (2, 3))  # whose rows, in pool order: Ray Train gives each its own worker
    assert x.shape == (6, 2)
    assert key == (4, 1, POOLED_STREAM)
    np.testing.assert_array_equal(trainer.calls[1][1], y)  # the pool is kept, not re-sent
    assert trainer.calls[1][2] == (4, 2, POOLED_STREAM)
    np.testing.assert_allclose(second["w"], [2.0, 2.0], rtol=F32_RTOL)


def test_pooled_selects_everybody_once_then_nobody() -> None:
    # Prepare
    scheme = Pooled()
    # Execute / Assert
    assert scheme.select(ctx(round=1)) == NAMES
    assert scheme.select(ctx(round=2)) == ()


def test_pooled_without_data_keeps_state_and_needs_a_trainer() -> None:
    # Prepare
    scheme = Pooled()
    data = [update(0, {"x": np.zeros((1, 2), np.float32), "y": np.zeros(1, np.int64)}, 1)]
    # Execute / Assert
    assert scheme.merge(ctx(), GLOBAL, []) is None
    with pytest.raises(RuntimeError, match="bind"):
        scheme.merge(ctx(), GLOBAL, data)


# --- fedavg / fedprox ----------------------------------------------------------------


def test_fedavg_weights_by_samples() -> None:
    # Execute: (1*[1,2] + 3*[3,4]) / 4
    out = FedAvg().merge(ctx(), GLOBAL, UPDATES)
    # Assert
    np.testing.assert_allclose(out["w"], [2.5, 3.5], rtol=F32_RTOL)


def test_fedavg_uniform_weighting() -> None:
    # Execute
    out = FedAvg(weighting="uniform").merge(ctx(), GLOBAL, UPDATES)
    # Assert
    np.testing.assert_allclose(out["w"], [2.0, 3.0], rtol=F32_RTOL)


def test_fedavg_server_lr_moves_part_way() -> None:
    # Prepare
    glob = {"w": np.array([1.0, 1.0], np.float32)}
    # Execute: 1 + 0.5 * ([2.5, 3.5] - 1)
    out = FedAvg(server_lr=0.5).merge(ctx(), glob, UPDATES)
    # Assert
    np.testing.assert_allclose(out["w"], [1.75, 2.25], rtol=F32_RTOL)


def test_fedavg_partial_update_keeps_unsent_keys() -> None:
    # Prepare
    glob = {"w": np.zeros(2, np.float32), "personal": np.array([5.0], np.float32)}
    # Execute
    out = FedAvg().merge(ctx(), glob, UPDATES)
    # Assert
    np.testing.assert_array_equal(out["personal"], [5.0])


def test_fedavg_with_no_updates_keeps_state() -> None:
    # Execute / Assert
    assert FedAvg().merge(ctx(), GLOBAL, []) is None


def test_fedprox_puts_mu_in_the_plan_and_merges_like_fedavg() -> None:
    # Prepare
    scheme = FedProx(mu=0.25)
    # Execute
    plan = scheme.plan(1)
    out = scheme.merge(ctx(), GLOBAL, UPDATES)
    # Assert
    assert isinstance(scheme, FedAvg)
    assert plan.client.pull() == 0.25 and plan.upload == "weights" and plan.start == "global"
    np.testing.assert_allclose(out["w"], [2.5, 3.5], rtol=F32_RTOL)


# --- fedsgd --------------------------------------------------------------------------


def test_fedsgd_plans_one_gradient_step() -> None:
    # Execute
    plan = FedSGD().plan(1)
    # Assert
    assert plan.upload == "gradient" and not plan.client.local_sgd


def test_fedsgd_applies_sample_weighted_gradient() -> None:
    # Prepare
    glob = {"w": np.array([1.0, 1.0], np.float32), "buf": np.array([3.0], np.float32)}
    grads = [update(0, {"w": np.array([1.0, 0.0], np.float32)}, 1), update(1, {"w": np.array([0.0, 1.0], np.float32)}, 3)]
    # Execute: mean grad = [0.25, 0.75]; w = 1 - 0.5 * mean
    out = FedSGD(server_lr=0.5).merge(ctx(), glob, grads)
    # Assert
    np.testing.assert_allclose(out["w"], [0.875, 0.625], rtol=F32_RTOL)
    np.testing.assert_array_equal(out["buf"], [3.0])  # buffers get no gradient and stay


def test_the_shapes_stay_narrow() -> None:
    # The bounds: a protocol of five methods, FedAvg's constructor of at most six arguments, a local plan of at
    # most six fields (the rest is each scheme's own client half and the wrappers')
    import dataclasses
    import inspect

    from agents.schemes.base import Scheme
    from agents.schemes.fedavg import FedAvg
    from sim.core.types import LocalPlan

    methods = {n for n, v in vars(Scheme).items() if callable(v) and not n.startswith("_")}
    assert methods == {"select", "plan", "merge", "state", "load_state"}
    assert len(inspect.signature(FedAvg).parameters) <= 6
    assert len(dataclasses.fields(LocalPlan)) <= 6
