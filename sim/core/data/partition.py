"""Partitioners: how a pool of labelled samples is split among institutions.

Pure functions over label arrays and an ``np.random.Generator``; each returns one index
array per institution, and no index is ever used twice. ``data.partition`` picks one:

- ``iid``: sizes from the scenario shares, label mix of the pool (stratified).
- ``dirichlet``: sizes from the shares, institution k's label mix ~ Dirichlet(alpha_k),
  alpha_k its ``label_skew`` or ``data.dirichlet_alpha`` (Hsu et al. 2019).
- ``quantity``: sizes from a power law that *replaces* the shares, labels as ``iid``.
- ``natural``: by a column of the data (table) or by the generator (synthetic).

An institution's own ``label_skew`` is honoured under every partition, so a scenario's
"this clinic sees mostly one class" holds whatever the dataset; the partition only sets
the mix of the institutions that do not name one. Sizes and mixes cannot both hold exactly
when the shares use the whole pool (the last to draw gets what is left), so institutions
asking for a skew draw first, smallest first, and a class that runs out is made up from
the classes that remain.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from sim.core.types import ConfigError, Scenario

PARTITIONS = ("iid", "dirichlet", "quantity", "natural")

# Purposes of the RNG streams: one independent stream per (seed, purpose, key...), so
# adding a draw in one place never shifts the numbers drawn anywhere else.
SMOKE, PARTITION, SPLIT, FEATURE_SKEW, DISCIPLINE, INSTITUTION, SAMPLES = range(7)
ROWS = 7  # the text datasets' per-institution row caps (sim.core.data.text.cap)
VALIDATION = 8  # which training rows an institution holds out for validation (sim.core.data.build_federation)
PUBLIC = 9  # which training rows go to the unlabeled public set instead (sim.core.data.public)

MIN_TRAIN, MIN_TEST = 4, 2  # below this an institution can neither train nor be scored
SMOKE_SAMPLES = 600  # samples kept under smoke=True (more if the smallest share needs them)


class Pool(NamedTuple):
    """A dataset split among institutions: samples plus (train, test) indices per institution."""

    x: np.ndarray  # float32, (n, *input_shape); text datasets: (n,) texts, tokenised by build_federation
    y: np.ndarray  # int64 labels 0..num_classes-1
    parts: list[tuple[np.ndarray, np.ndarray]]  # scenario order
    num_classes: int


def stream(seed: int, *keys: int) -> np.random.Generator:
    """An independent RNG stream for (seed, *keys); never global state."""
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


def apportion(shares: Sequence[float], total: int) -> np.ndarray:
    """Integer counts, each within 1 of share*total, summing to round(sum(shares)*total) (largest remainder)."""
    raw = np.asarray(shares, dtype=float) * total
    counts = np.floor(raw).astype(np.int64)
    missing = int(np.floor(raw.sum() + 0.5)) - int(counts.sum())
    if missing > 0:  # ties go to the earlier institution (stable sort)
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:missing]] += 1
    return counts


def num_test(n: int, test_fraction: float) -> int:
    """Size of the test split of n samples: round(test_fraction * n)."""
    return int(np.floor(test_fraction * n + 0.5))


def smallest_workable(test_fraction: float) -> int:
    """Fewest samples that leave MIN_TRAIN train and MIN_TEST test samples."""
    n = MIN_TRAIN + MIN_TEST
    while num_test(n, test_fraction) < MIN_TEST or n - num_test(n, test_fraction) < MIN_TRAIN:
        n += 1
    return n


def check_sizes(names: Sequence[str], n_train, n_test, key: str, fix: str) -> None:
    """Raise ConfigError(key) naming the first institution with too few train or test samples."""
    for name, tr, te in zip(names, n_train, n_test):
        if tr < MIN_TRAIN or te < MIN_TEST:
            raise ConfigError(
                key,
                f"institution '{name}' gets {tr} train and {te} test samples; it needs at least "
                f"{MIN_TRAIN} and {MIN_TEST}: {fix}",
            )


def split_train_test(
    idx: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, test) split of an institution's indices; test holds round(fraction*n)."""
    idx = rng.permutation(idx)
    k = num_test(len(idx), test_fraction)
    return np.sort(idx[k:]), np.sort(idx[:k])


def split_stratified(
    idx: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) split that keeps the label mix: test holds round(fraction*n), each label its share (largest
    remainder), so a label's test rows depend on the counts alone, never on the draw."""
    idx = np.asarray(idx, np.int64)
    if len(idx) == 0:
        return idx, idx
    groups, counts = np.unique(labels[idx], return_counts=True)
    take = apportion(counts / counts.sum(), num_test(len(idx), test_fraction))
    test = np.sort(np.concatenate([rng.choice(idx[labels[idx] == g], t, replace=False) for g, t in zip(groups, take)]))
    return np.setdiff1d(idx, test), test


def label_mix(alpha: float | None, pool_mix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Target label proportions: Dirichlet(alpha) over the classes, or the pool's own mix when alpha is None."""
    if alpha is None:
        return pool_mix
    mix = rng.dirichlet(np.full(len(pool_mix), float(alpha)))
    if not np.all(np.isfinite(mix)) or mix.sum() <= 0:  # tiny alpha can underflow: all mass on one class
        mix = np.eye(len(pool_mix))[rng.integers(len(pool_mix))]
    return mix


def by_label_mix(
    labels: np.ndarray,
    sizes: Sequence[int],
    mixes: Sequence[np.ndarray],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Give institution k sizes[k] indices whose labels follow mixes[k] as far as the pool allows.

    Institutions draw in the order given, without replacement. When a class has run out,
    the shortfall is filled from the classes that still have samples, in proportion to
    what is left of them, so sizes are always met (as long as they fit the pool).
    """
    num_classes = len(mixes[0]) if len(mixes) else 0
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    left = np.array([len(b) for b in by_class], dtype=np.int64)
    out = []
    for n, mix in zip(sizes, mixes):
        take = np.minimum(apportion(mix / mix.sum(), int(n)), left)
        short = int(n) - int(take.sum())
        while short > 0 and (left - take).sum() > 0:  # one pass nearly always suffices
            spare = left - take
            take += np.minimum(apportion(spare / spare.sum(), min(short, int(spare.sum()))), spare)
            short = int(n) - int(take.sum())
        used = np.array([len(b) for b in by_class]) - left
        idx = np.concatenate([b[u : u + t] for b, u, t in zip(by_class, used, take)]).astype(np.int64)
        out.append(rng.permutation(idx))  # not grouped by class
        left -= take
    return out


def quantity_sizes(k: int, total: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Power-law sizes: the i-th largest share ~ i**-exponent, dealt to institutions in random order."""
    weights = np.arange(1, k + 1, dtype=float) ** -float(exponent)
    return apportion(weights[rng.permutation(k)] / weights.sum(), total)


def natural(groups: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Indices of the rows whose group (e.g. the institution column) equals each name."""
    groups = np.asarray(groups).astype(str)
    return [np.flatnonzero(groups == name) for name in names]


def planned_sizes(data: Mapping, scenario: Scenario, pool: int, rng: np.random.Generator) -> np.ndarray:
    """Samples per institution under data.partition (iid, dirichlet or quantity) from a pool of that size."""
    shares = np.array([i.share for i in scenario.institutions], dtype=float)
    shares /= max(shares.sum(), 1.0)  # hand-typed shares may sum to a hair over 1; never ask for more than the pool
    if data["partition"] == "quantity":
        total = int(np.floor(shares.sum() * pool + 0.5))
        return quantity_sizes(len(shares), total, data["quantity_exponent"], rng)
    return apportion(shares, pool)


def partition(
    labels: np.ndarray, num_classes: int, data: Mapping, scenario: Scenario, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split a pool by data.partition (iid, dirichlet or quantity): one index array per institution."""
    name = data["partition"]
    if name not in ("iid", "dirichlet", "quantity"):
        raise ConfigError("data.partition",
                          f"partition '{name}' does not apply here; choose iid, dirichlet or quantity")
    sizes = planned_sizes(data, scenario, len(labels), rng)
    pool_mix = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
    default = data["dirichlet_alpha"] if name == "dirichlet" else None
    alphas = [i.label_skew if i.label_skew is not None else default for i in scenario.institutions]
    mixes = [label_mix(a, pool_mix, rng) for a in alphas]
    # When the shares use the whole pool the last to draw must take what is left. So institutions
    # that ask for a skew draw first, smallest first, and the leftovers land where they distort least.
    order = sorted(range(len(alphas)), key=lambda k: (alphas[k] is None, sizes[k], k))
    taken = by_label_mix(labels, [sizes[k] for k in order], [mixes[k] for k in order], rng)
    out: list[np.ndarray] = [np.empty(0, np.int64)] * len(order)
    for k, idx in zip(order, taken):
        out[k] = idx
    return out


def smoke_size(scenario: Scenario, test_fraction: float, available: int) -> int:
    """How many samples to keep under smoke=True: SMOKE_SAMPLES, or enough for the smallest share."""
    smallest = min(i.share for i in scenario.institutions)
    need = int(np.ceil((smallest_workable(test_fraction) + 1) / smallest))
    return min(available, max(SMOKE_SAMPLES, need))


def check_partition(data: Mapping, scenario: Scenario, pool: int) -> None:
    """Validate the partition keys and that every institution gets enough of a pool of that size."""
    if data["partition"] not in ("iid", "dirichlet", "quantity"):
        raise ConfigError("data.partition", f"partition '{data['partition']}' does not apply here; "
                          "choose iid, dirichlet or quantity (natural needs data.name=table)")
    alpha, exponent = data["dirichlet_alpha"], data["quantity_exponent"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ConfigError("data.dirichlet_alpha", f"must be a number > 0, got {alpha!r}")
    if not isinstance(exponent, (int, float)) or isinstance(exponent, bool) or exponent < 0:
        raise ConfigError("data.quantity_exponent", f"must be a number >= 0 (0 = equal sizes), got {exponent!r}")
    tf = data["test_fraction"]
    # Under quantity, which institution gets which size depends on the seed; the sizes do not.
    sizes = planned_sizes(data, scenario, pool, np.random.default_rng(0))
    tests = np.array([num_test(n, tf) for n in sizes])
    if data["partition"] == "quantity":
        if np.any(sizes - tests < MIN_TRAIN) or np.any(tests < MIN_TEST):
            raise ConfigError("data.quantity_exponent", f"the smallest of {len(sizes)} power-law sizes is "
                              f"{sizes.min()} of {pool} samples, below the {smallest_workable(tf)} an institution "
                              "needs; lower data.quantity_exponent (0 = equal sizes) or use fewer institutions")
        return
    need = smallest_workable(tf)
    check_sizes(scenario.names, sizes - tests, tests, "scenario.institutions",
                f"raise its share to at least {need / pool:.4f} ({need} of the {pool} samples available)")
