"""Split learning / vertical federated learning: institutions hold different views of the same entities.

Vepakomma, Gupta, Swedish & Raskar, "Split learning for health: Distributed deep learning without
sharing raw patient data" (2018), in the vertical form with a label holder (Ceballos et al., "SplitNN-
driven Vertical Partitioning", 2020; Liu et al., "Vertical Federated Learning: Concepts, Advances and
Challenges", 2024). Each institution trains a bottom model on its own view; the label holder trains
the top model over their concatenated embeddings. Per batch, each other institution sends its
embeddings up (``embedding_dim`` float32 per entity) and receives the gradient of the loss with respect
to them (as many bytes), optionally with Gaussian noise of std ``embedding_noise`` added to what it sends
(Titcombe et al., "Practical Defences Against Model Inversion Attacks for Split Neural Networks", 2021).

Bytes per epoch for each institution other than the label holder, ``n`` aligned training entities:
up ``4 * embedding_dim * n``, down as many (:func:`epoch_bytes`); scoring sends embeddings up only.

How it departs from the scheme protocol (:mod:`agents.schemes.base`): the horizontal protocol's round is
"every institution trains a whole model, the coordinator merges"; here a round is an epoch of per-batch
exchanges between bottom and top models, with no merge. So ``select``/``plan``/``merge`` keep the
protocol's shape (everybody, nothing uploaded, nothing merged), and the vertical runner
(:mod:`sim.vertical`) drives :class:`SplitModel` instead of the round loop. The two baselines of a
vertical comparison are the same model on fewer or pooled views (:func:`layout`): ``isolated``, the label
holder's own bottom and top on its own view (the others have no labels, so nothing to train), and
``pooled``, one bottom over all views' features concatenated in one place, then the same top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from agents.schemes.base import Scheme, check_range, register
from sim.core.models import model_flops
from sim.core.train import lr_scale
from sim.core.types import ConfigError, InstitutionSpec, LocalPlan, RoundContext, State, TrainingSpec, Update

FLOAT = 4  # bytes of a float32 embedding or gradient value
VERTICAL = ("isolated", "split_learning", "pooled")  # schemes that run on views (sim.vertical)
NOISE_STREAM = 0x5EED


@register("split_learning")
class SplitLearning(Scheme):
    """Bottom models at every institution, the top at the label holder; embeddings up, gradients down per batch."""

    def __init__(self, *, embedding_dim: int = 16, embedding_noise: float = 0.0, top_hidden: int = 32):
        self.embedding_dim = int(check_range("embedding_dim", embedding_dim, 1, 4096))
        self.embedding_noise = check_range("embedding_noise", embedding_noise, 0.0)
        self.top_hidden = int(check_range("top_hidden", top_hidden, 0, 4096))

    def check(self, specs: Sequence[InstitutionSpec]) -> None:
        """Views need at least two institutions (one view alone is the isolated baseline)."""
        if len(specs) < 2:
            raise ConfigError("scheme", "split_learning needs two or more institutions, each with a view (data.views); "
                              "one institution alone is scheme=isolated")

    def plan(self, round: int) -> LocalPlan:
        """No whole model crosses: what crosses per batch is booked by the vertical runner."""
        return LocalPlan(upload="nothing")

    def merge(self, ctx: RoundContext, state: State, updates: Sequence[Update]) -> State | None:
        """Nothing to merge: the top model lives at the label holder."""
        return None


@dataclass(frozen=True)
class Block:
    """One bottom model: whose it is and which views' features it reads (pooled: all of them)."""

    party: str
    views: tuple[str, ...]


def layout(scheme: str, parties: Sequence[str], holder: str, members: Sequence[str]) -> tuple[Block, ...]:
    """The bottom models a vertical scheme trains, over the ``members`` taking part (empty: nobody can train).

    split_learning: one per member; isolated: the label holder's own; pooled: one at the label holder over every
    member's view. Without the label holder nobody has labels: no block."""
    if holder not in members:
        return ()
    if scheme == "isolated":
        return (Block(holder, (holder,)),)
    if scheme == "pooled":
        return (Block(holder, tuple(p for p in parties if p in members)),)
    if scheme == "split_learning":
        return tuple(Block(p, (p,)) for p in parties if p in members)
    raise ConfigError("scheme", f"{scheme} does not run on views (data.views); use {', '.join(VERTICAL)}")


def epoch_bytes(blocks: Sequence[Block], holder: str, rows: int, embedding_dim: int) -> dict[str, tuple[int, int]]:
    """(bytes up, bytes down) of one training epoch over ``rows`` entities for each block's party: embeddings up and
    gradients down for each party other than the label holder, nothing for the label holder's own."""
    each = FLOAT * embedding_dim * rows
    return {b.party: (0, 0) if b.party == holder else (each, each) for b in blocks}


def _mlp(width: int, hidden: Sequence[int], out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    return nn.Sequential(*layers, nn.Linear(width, out))


class SplitModel:
    """The bottoms of :func:`layout` and the label holder's top, trained by per-batch exchange of numpy arrays."""

    def __init__(self, blocks: Sequence[Block], x: Mapping[str, np.ndarray], holder: str, num_classes: int, *,
                 hidden: Sequence[int], scheme: SplitLearning, training: TrainingSpec, seed: int):
        self.blocks, self.holder, self.scheme, self.training, self.seed = tuple(blocks), holder, scheme, training, seed
        self.x = {b.party: torch.from_numpy(np.concatenate([x[v] for v in b.views], axis=1)) for b in self.blocks}
        scale = [len(b.views) for b in self.blocks]  # pooled: one bottom as wide as the bottoms it replaces
        dim = scheme.embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.bottoms = {b.party: _mlp(self.x[b.party].shape[1], [h * k for h in hidden], dim * k)
                            for b, k in zip(self.blocks, scale)}
            width = dim * sum(scale)
            top = [nn.ReLU(), *([nn.Linear(width, scheme.top_hidden), nn.ReLU()] if scheme.top_hidden else [])]
            self.top = nn.Sequential(*top, nn.Linear(scheme.top_hidden or width, num_classes))
        self.optimizers = {p: self._optimizer(m) for p, m in [*self.bottoms.items(), (holder + "/top", self.top)]}
        self.flops = {p: model_flops(m, (self.x[p].shape[1],)) for p, m in self.bottoms.items()}
        self.flops[holder] = self.flops.get(holder, 0) + model_flops(self.top, (width,))

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        t = self.training
        if t.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def _embed(self, party: str, rows: np.ndarray, noise: torch.Generator | None) -> torch.Tensor:
        """A party's embeddings of ``rows``, with its noise when it sends them to the label holder."""
        e = self.bottoms[party](self.x[party][rows])
        if noise is not None and party != self.holder and self.scheme.embedding_noise > 0:
            e = e + self.scheme.embedding_noise * torch.randn(e.shape, generator=noise)
        return e

    def epoch(self, rows: np.ndarray, y: np.ndarray, round: int, again: int = 0) -> tuple[float, int]:
        """One pass over the training ``rows`` (labels ``y``) in a seeded order, the ``again``-th of ``round`` (its
        order and noise drawn from (seed, round, again); learning rate by round); (mean loss, batches)."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = self.training.lr * lr_scale(self.training.schedule, round, self.training)
        extra = [again, 2] if again else []  # the first pass of a round keeps its key (2: never a scoring key)
        order = np.random.default_rng([self.seed, round, 0x5B, *extra]).permutation(len(rows))
        noise = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, round, NOISE_STREAM, *extra])
                                                  .integers(2**62)))
        labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
        losses, size = [], self.training.batch_size
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            sent = {b.party: self._embed(b.party, rows[batch], noise) for b in self.blocks}
            # What crosses: each party's embeddings as float32 arrays, the label holder's gradients back.
            crossed = {p: torch.from_numpy(e.detach().numpy().astype(np.float32)).requires_grad_()
                       for p, e in sent.items()}
            loss = nn.functional.cross_entropy(self.top(torch.cat([crossed[b.party] for b in self.blocks], dim=1)),
                                               labels[batch])
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, e in sent.items():
                e.backward(torch.from_numpy(crossed[p].grad.numpy().astype(np.float32)))
            for opt in self.optimizers.values():
                opt.step()
            losses.append(float(loss.detach()) * len(batch))
        return float(np.sum(losses) / max(len(rows), 1)), -(-len(rows) // size)

    @torch.no_grad()
    def score(self, rows: np.ndarray, y: np.ndarray, round: int) -> tuple[float, float]:
        """(accuracy, mean loss) on ``rows``; the embeddings sent for it carry the same noise as in training."""
        key = np.random.default_rng([self.seed, round, NOISE_STREAM, 1]).integers(2**62)
        noise = torch.Generator().manual_seed(int(key))
        logits = self.top(torch.cat([self._embed(b.party, rows, noise) for b in self.blocks], dim=1))
        labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
        return float((logits.argmax(1) == labels).float().mean()), float(nn.functional.cross_entropy(logits, labels))
