"""FedProx's Synthetic(alpha, beta) data, with LEAF-style clusters as disciplines.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (FedProx repo,
data/synthetic_1_1/generate_synthetic.py): device k draws u_k ~ N(0, alpha),
W_k ~ N(u_k, 1) (dim x classes), b_k ~ N(u_k, 1), B_k ~ N(0, beta), v_k ~ N(B_k, 1);
its samples are x ~ N(v_k, diag(j**-1.2)), y = argmax softmax(x W_k + b_k). As in the
paper's code, alpha and beta are standard deviations.

Disciplines (LEAF's clusters, Caldas et al. 2018): every standard-normal draw z behind
u, B, W, b and v is split into a part shared by the discipline and the institution's own
part, z = sqrt(1 - within) * z_discipline + sqrt(within) * z_institution. So each
institution is still exactly a Synthetic(alpha, beta) device, but two institutions of one
discipline differ by only ``within`` times the expected squared distance of two from
different disciplines. within = 1 makes disciplines irrelevant (the paper's independent
devices); within = 0 makes a discipline's institutions identical in distribution. The
discipline parts are split the same way around one common task of the consortium:
z_discipline = sqrt(1 - between) * z_common + sqrt(between) * z_own; between = 1 (the
paper) gives disciplines unrelated tasks, smaller values give them a shared core that
collaboration can learn.

An institution's ``label_skew`` (Dirichlet alpha) draws CANDIDATES times its sample count
from its generator, draws a label mix ~ Dirichlet(alpha) and keeps that many of each
class; classes its generator seldom produces come out short and the shortfall is filled
from the other candidates (partition.by_label_mix).
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping, NamedTuple

import numpy as np

from sim.core.data.partition import (
    DISCIPLINE, INSTITUTION, MIN_TEST, MIN_TRAIN, SAMPLES, SMOKE_SAMPLES, SPLIT, Pool, apportion, by_label_mix,
    check_sizes, label_mix, num_test, smallest_workable, split_train_test, stream,
)
from sim.core.types import ConfigError, Scenario

DEFAULTS = {
    "name": "synthetic",
    "partition": "natural",
    "num_samples": 6000,
    "test_fraction": 0.2,
    "dim": 60,
    "num_classes": 10,
    "alpha": 0.5,
    "beta": 0.5,
    "within": 0.1,
    "between": 0.6,
}
CONSORTIUM = 0xC0FFEE  # RNG key of the common task every discipline is drawn around
CANDIDATES = 10  # candidates drawn per kept sample under label_skew


class Model(NamedTuple):
    """One institution's generator: its labelling rule (W, b) and its input mean v."""

    W: np.ndarray  # (dim, num_classes)
    b: np.ndarray  # (num_classes,)
    v: np.ndarray  # (dim,)


def _normals(rng: np.random.Generator, dim: int, num_classes: int) -> dict[str, np.ndarray]:
    """The standard-normal draws behind one generator (or one discipline's share of them)."""
    return {
        "u": rng.standard_normal(),
        "B": rng.standard_normal(),
        "W": rng.standard_normal((dim, num_classes)),
        "b": rng.standard_normal(num_classes),
        "v": rng.standard_normal(dim),
    }


def discipline_key(discipline: str) -> int:
    """Stable RNG key of a discipline (its name's CRC32), so adding one never moves another."""
    return zlib.crc32(discipline.encode("utf-8"))


def institution_models(data: Mapping, scenario: Scenario, seed: int) -> list[Model]:
    """Each institution's generator (W, b, v), in scenario order."""
    dim, classes = int(data["dim"]), int(data["num_classes"])
    shared, own = math.sqrt(1.0 - data["within"]), math.sqrt(data["within"])
    between = data.get("between", 1.0)
    common = _normals(stream(seed, DISCIPLINE, CONSORTIUM), dim, classes)
    centres: dict[str, dict[str, np.ndarray]] = {}
    models = []
    for spec in scenario.institutions:
        if spec.discipline not in centres:
            # A discipline's centre = the consortium's common task plus the discipline's own part.
            d = _normals(stream(seed, DISCIPLINE, discipline_key(spec.discipline)), dim, classes)
            centres[spec.discipline] = {n: math.sqrt(1 - between) * common[n] + math.sqrt(between) * d[n] for n in d}
        d = centres[spec.discipline]
        k = _normals(stream(seed, INSTITUTION, spec.index), dim, classes)
        z = {name: shared * d[name] + own * k[name] for name in d}
        u, B = data["alpha"] * z["u"], data["beta"] * z["B"]
        models.append(Model(W=u + z["W"], b=u + z["b"], v=B + z["v"]))
    return models


def sample(
    model: Model, n: int, rng: np.random.Generator, label_skew: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n samples from one generator; with label_skew, a Dirichlet(label_skew) label mix."""
    dim, classes = model.W.shape
    sd = np.arange(1, dim + 1, dtype=float) ** -0.6  # sqrt of the paper's variances j**-1.2
    m = n if label_skew is None else CANDIDATES * n
    x = model.v + rng.standard_normal((m, dim)) * sd
    y = np.argmax(x @ model.W + model.b, axis=1)  # softmax is monotone: argmax of the logits
    if label_skew is not None:
        mix = label_mix(label_skew, np.full(classes, 1.0 / classes), rng)
        keep = by_label_mix(y, [n], [mix], rng)[0]
        x, y = x[keep], y[keep]
    return x.astype(np.float32), y.astype(np.int64)


def _workable(scenario: Scenario, total: int, test_fraction: float) -> bool:
    sizes = apportion([i.share for i in scenario.institutions], total)
    tests = [num_test(n, test_fraction) for n in sizes]
    return all(n - t >= MIN_TRAIN and t >= MIN_TEST for n, t in zip(sizes, tests))


def needed_samples(scenario: Scenario, test_fraction: float) -> int:
    """Smallest data.num_samples that gives every institution enough train and test samples."""
    smallest = min(i.share for i in scenario.institutions)
    total = max(1, math.floor(smallest_workable(test_fraction) / smallest))
    while not _workable(scenario, total, test_fraction):
        total += 1
    return total


def check(data: Mapping, scenario: Scenario) -> None:
    """Validate the synthetic keys and that every institution gets enough samples."""
    if data["partition"] != "natural":
        raise ConfigError(
            "data.partition",
            f"partition '{data['partition']}' does not apply to synthetic data, whose institutions "
            "each have their own generator; use data.partition=natural",
        )
    for key, low in (("num_samples", 1), ("dim", 1), ("num_classes", 2)):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < low:
            raise ConfigError(f"data.{key}", f"must be an integer >= {low}, got {data[key]!r}")
    for key in ("alpha", "beta"):
        if not isinstance(data[key], (int, float)) or data[key] < 0:
            raise ConfigError(f"data.{key}", f"must be a number >= 0 (a standard deviation), got {data[key]!r}")
    for key in ("within", "between"):
        if not isinstance(data[key], (int, float)) or not 0 <= data[key] <= 1:
            raise ConfigError(f"data.{key}", f"must be between 0 and 1, got {data[key]!r}")
    sizes = apportion([i.share for i in scenario.institutions], data["num_samples"])
    tests = [num_test(n, data["test_fraction"]) for n in sizes]
    need = needed_samples(scenario, data["test_fraction"])
    check_sizes(scenario.names, sizes - np.array(tests), tests, "data.num_samples",
                f"raise data.num_samples to at least {need} or raise that institution's share")


def build(data: Mapping, scenario: Scenario, seed: int, smoke: bool = False) -> Pool:
    """Generate every institution's samples from its own generator (the natural split)."""
    total = data["num_samples"]
    if smoke:
        total = min(total, max(SMOKE_SAMPLES, needed_samples(scenario, data["test_fraction"])))
    sizes = apportion([i.share for i in scenario.institutions], total)
    xs, ys, parts, offset = [], [], [], 0
    for spec, model, n in zip(scenario.institutions, institution_models(data, scenario, seed), sizes):
        x, y = sample(model, int(n), stream(seed, SAMPLES, spec.index), spec.label_skew)
        xs.append(x)
        ys.append(y)
        idx = np.arange(offset, offset + len(y))
        parts.append(split_train_test(idx, data["test_fraction"], stream(seed, SPLIT, spec.index)))
        offset += len(y)
    return Pool(np.concatenate(xs), np.concatenate(ys), parts, int(data["num_classes"]))
