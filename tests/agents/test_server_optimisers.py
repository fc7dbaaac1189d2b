"""Server optimisers (FedAvgM, FedAdam, FedYogi): the pure steps against hand computations, the schemes, and resume.

Known answers are computed in float64 by hand from Reddi et al.'s Algorithm 2; ``1e-12``
relative tolerance is float64 round-off of a few operations.
"""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from agents.schemes import SCHEMES
from agents.schemes.fedadam import FedAdam
from agents.schemes.fedavg import FedAvg
from agents.schemes.fedavgm import FedAvgM
from agents.schemes.fedyogi import FedYogi
from agents.schemes.server_optimisers import adaptive_step, momentum_step
from sim.cli import guard
from sim.checks import load_spec
from sim.core.types import RoundContext, Update
from stopping import resume_matches_straight
from refusal import refused

CONF = Path(__file__).resolve().parents[2] / "conf" / "scheme"
NEW = ("fedavgm", "fedadam", "fedyogi")
NAMES = ("a", "b")
F64 = 1e-12


def ctx(round: int = 1, scale: float = 1.0) -> RoundContext:
    return RoundContext(round=round, seed=0, cohort=NAMES, server_scale=scale)


def updates(*rows: list[float]) -> list[Update]:
    """One update per row, one sample each, float64 weights ``w``."""
    return [Update(institution=NAMES[i], index=i, state={"w": np.array(r)}, num_samples=1, train_loss=0.0,
                   compute_seconds=0.0, bytes_up=0) for i, r in enumerate(rows)]


# --- the pure steps ----------------------------------------------------------------


def test_momentum_step_known_answer_over_two_rounds() -> None:
    # Prepare
    x0, lr, mu = {"w": np.array([1.0, 2.0])}, 0.5, 0.9
    # Execute: round 1 delta = (1, -1); round 2 the target is 1 above the new state everywhere
    x1, v1 = momentum_step(x0, {"w": np.array([2.0, 1.0])}, {}, lr, mu)
    x2, v2 = momentum_step(x1, {"w": x1["w"] + 1.0}, v1, lr, mu)
    # Assert: v1 = d1; x1 = x0 + 0.5 v1; v2 = 0.9 v1 + (1, 1); x2 = x1 + 0.5 v2
    np.testing.assert_allclose(v1["w"], [1.0, -1.0], rtol=F64)
    np.testing.assert_allclose(x1["w"], [1.5, 1.5], rtol=F64)
    np.testing.assert_allclose(v2["w"], [1.9, 0.1], rtol=F64)
    np.testing.assert_allclose(x2["w"], [2.45, 1.55], rtol=F64)


@pytest.mark.parametrize("rule", ["adam", "yogi"])
def test_adaptive_step_known_answer(rule: str) -> None:
    # Prepare
    x0, d = {"w": np.array([0.0, 0.0])}, np.array([0.2, -0.001])
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 0.01
    # Execute
    x1, (m, v) = adaptive_step(x0, {"w": d}, ({}, {}), rule=rule, lr=lr, beta1=b1, beta2=b2, tau=tau)
    # Assert: m = 0.1 d; v from v0 = tau^2 = 1e-4
    v_hand = (b2 * 1e-4 + (1 - b2) * d**2 if rule == "adam"
              else 1e-4 - (1 - b2) * d**2 * np.sign(1e-4 - d**2))  # yogi: v grows for the big coordinate, shrinks for the small
    np.testing.assert_allclose(m["w"], 0.1 * d, rtol=F64)
    np.testing.assert_allclose(v["w"], v_hand, rtol=F64)
    np.testing.assert_allclose(x1["w"], lr * 0.1 * d / (np.sqrt(v_hand) + tau), rtol=F64)


def test_integer_buffers_take_the_mean_and_unsent_keys_keep_value_and_moments() -> None:
    # Prepare: a counter, a sent float key, an unsent float key with moments from before
    x0 = {"n": np.array([3], np.int64), "w": np.array([1.0]), "head": np.array([5.0])}
    before = ({"head": np.array([0.7])}, {"head": np.array([0.2])})
    # Execute
    x1, (m, v) = adaptive_step(x0, {"n": np.array([4], np.int64), "w": np.array([2.0])}, before,
                               rule="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # Assert
    assert x1["n"].dtype == np.int64 and x1["n"][0] == 4 and "n" not in m
    assert x1["head"][0] == 5.0 and m["head"][0] == 0.7 and v["head"][0] == 0.2
    assert x1["w"][0] > 1.0


# --- the schemes -------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_yaml_builds_the_registered_scheme(name: str) -> None:
    scheme = hydra.utils.instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert type(scheme) is SCHEMES[name] and isinstance(scheme, FedAvg)


def test_fedadam_with_large_tau_and_no_beta1_takes_fedavg_like_steps() -> None:
    # Prepare: beta1 = 0 makes m = delta, beta2 = 0 makes v = delta^2 (forgetting v's start tau^2);
    # tau >> |delta| then makes the step ~ (server_lr / tau) * delta, so server_lr = tau gives ~ FedAvg's replacement
    tau = 1e3
    glob = {"w": np.array([0.0, 1.0])}
    ups = updates([1.0, 2.0], [3.0, 0.0])  # mean (2, 1): delta (2, 0)
    # Execute
    adam = FedAdam(server_lr=tau, beta1=0.0, beta2=0.0, tau=tau).merge(ctx(), glob, ups)
    avg = FedAvg().merge(ctx(), glob, ups)
    # Assert: the step is delta * tau / (|delta| + tau): relative gap |delta| / tau = 2e-3 here
    np.testing.assert_allclose(adam["w"], avg["w"], rtol=3e-3, atol=1e-12)
    assert not np.array_equal(adam["w"], avg["w"])  # close, not the same rule


def test_fedavgm_without_momentum_is_fedavg() -> None:
    glob, ups = {"w": np.array([0.0, 1.0])}, updates([1.0, 2.0], [3.0, 0.0])
    for _ in range(2):
        assert np.array_equal(FedAvgM(server_lr=0.7, momentum=0.0).merge(ctx(), glob, ups)["w"],
                              FedAvg(server_lr=0.7).merge(ctx(), glob, ups)["w"])


@pytest.mark.parametrize("cls", [FedAvgM, FedAdam, FedYogi])
def test_server_scale_multiplies_server_lr(cls) -> None:
    # Execute: a half-scale round under lr 0.02 equals a full-scale round under lr 0.01
    glob, ups = {"w": np.array([0.0, 1.0])}, updates([1.0, 2.0], [3.0, 0.0])
    scaled = cls(server_lr=0.02).merge(ctx(scale=0.5), glob, ups)
    plain = cls(server_lr=0.01).merge(ctx(), glob, ups)
    # Assert
    assert scaled["w"].tobytes() == plain["w"].tobytes()


@pytest.mark.parametrize("cls", [FedAvgM, FedAdam, FedYogi])
def test_saved_optimiser_state_continues_bit_for_bit(cls) -> None:
    # Prepare: four rounds of moving targets
    rng = np.random.default_rng(1)
    targets = [updates(rng.normal(size=3).tolist(), rng.normal(size=3).tolist()) for _ in range(4)]
    glob = {"w": np.zeros(3)}

    def rounds(scheme, state, which):
        for r in which:
            state = scheme.merge(ctx(r), state, targets[r])
        return state

    # Execute: 4 rounds straight vs 2, then a fresh scheme loaded from state(), then 2
    straight = rounds(cls(), glob, range(4))
    first = cls()
    half = rounds(first, glob, range(2))
    saved = {k: v.copy() for k, v in first.state().items()}
    second = cls()
    second.load_state(saved)
    resumed = rounds(second, half, range(2, 4))
    # Assert
    assert saved and all(k.partition("/")[0] in ("m", "v", "velocity") for k in saved)
    assert straight["w"].tobytes() == resumed["w"].tobytes()


@pytest.mark.parametrize("override, named", [
    ("scheme.beta1=1.0", "scheme.beta1: must lie in [0, 1)"),
    ("scheme.beta2=-0.1", "scheme.beta2"),
    ("scheme.tau=0.0", "scheme.tau"),
    ("scheme.server_lr=0.0", "scheme.server_lr"),
    ("scheme.momentum=0.1", "scheme.momentum: unknown config key"),  # fedadam has no momentum
])
def test_bad_settings_give_one_line_before_anything_runs(override: str, named: str, capsys) -> None:
    err = refused(["scheme=fedadam", override], capsys)
    assert named in err


def test_momentum_of_one_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        guard("config", ["scheme=fedavgm", "scheme.momentum=1.0"], load_spec)
    assert "scheme.momentum: must lie in [0, 1)" in capsys.readouterr().err


# --- end to end: resume and determinism -----------------------------------------------


@pytest.mark.parametrize("scheme", NEW)
def test_a_run_resumed_after_round_2_matches_4_rounds_straight(scheme: str, tmp_path) -> None:
    # The optimiser's moments come back exactly from the checkpoint: every metric of every round identical
    resume_matches_straight([f"scheme={scheme}"], tmp_path)
