"""Local training and scoring of many small institutions at once, over stacked parameters.

A host that carries hundreds of small institutions (logistic regression, MLPs on tabular
shards) spends most of a round in per-institution Python overhead when it calls
:func:`sim.core.train.local_train` one after the other. :func:`train_many` runs a cohort as
one computation instead: every parameter gets a leading institution axis, and SGD is
written out with the same formulas as ``torch.optim.SGD`` (d = g + wd*p; buf = m*buf + d,
buf = d at the first step; p -= lr*buf). One step of all institutions is

- for a flat stack of Linear layers and element-wise activations: each layer one batched
  matrix product with every institution's own weights (``torch.baddbmm``) and plain
  autograd, which gives each institution its own gradient since their losses are
  independent (one Linear layer, logistic regression, takes its gradient in closed form).
  Institutions are ordered by step count and a step trains only those with steps left (a
  suffix of the stack, updated in place);
- for other pure models (the CNN): ``torch.vmap`` over ``torch.func.grad_and_value`` of a
  pure loss (FedJAX's per-client step, batched), every institution in every call, those
  that are done frozen.

Equality with the one-at-a-time path: each institution draws its minibatches from the
same ``rng_for(key)`` -> ``_minibatches`` call as ``local_train``, so it sees the same
samples in the same order. Shards of unequal size give unequal step counts and smaller
last batches: batches are padded to ``batch_size`` and masked (the loss is a mean over the
valid samples only), and an institution whose steps are done takes no update and no
momentum. Results match ``local_train`` to float32 rounding, not bit for bit: batched and
unbatched matmuls sum in different orders. They are bit for bit the same whichever other
institutions share the computation (matrix products of fixed shape per institution), so a
host's mix never changes a result. :class:`ScoringRows` scores many test sets in a few
forward passes over all their rows.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sim.core.models import get_state
from sim.core.train import _minibatches, numpy_rng_for
from sim.core.types import State, TrainingSpec

MAX_BATCH = 256  # institutions per batched call: bounds the stacked parameters and batches held in memory

# Modules that act on each value alone: applied to a stacked (institutions, batch, features) tensor they compute
# exactly what they compute per institution, so a stack of them and Linear layers needs no vmap (see _stacked_forward).
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)

# Modules with no randomness and no running statistics: a vmapped functional call of them
# computes exactly what the module does (Dropout, RReLU, BatchNorm and transformers do not).
_PURE = (
    nn.Sequential, nn.Flatten, nn.Unflatten, nn.Linear, nn.Bilinear,
    nn.Conv1d, nn.Conv2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.PReLU, nn.Softmax, nn.LogSoftmax, *_ELEMENTWISE,
)

Result = tuple[dict[str, np.ndarray], float, int]
"""Per institution: new state (named like ``get_state``), mean per-sample data loss, optimizer steps."""


def batchable(model: nn.Module, training: TrainingSpec) -> bool:
    """Whether :func:`train_many` can stand in for ``local_train`` for this model and training (plain SGD steps, at
    most a proximal pull; whether a scheme's local step is that is its client half's to say)."""
    pure = all(type(m) in _PURE for m in model.modules())
    params = list(model.parameters())
    fp32 = bool(params) and all(p.dtype == torch.float32 for p in params)
    return (
        pure
        and fp32
        and not list(model.buffers())  # buffers mean running statistics or other state that training moves
        and training.precision == "fp32"
        and training.optimizer == "sgd"  # the vectorised step writes out SGD's update, not Adam's
    )


def _steps_of(key: tuple[int, ...], n: int, training: TrainingSpec) -> list[np.ndarray]:
    """The minibatch index arrays ``local_train`` would draw for this key and shard size (same RNG use)."""
    return _minibatches(numpy_rng_for(key), n, training)  # rng_for's torch stream only seeds dropout: none here


def _as_tensor(a: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """A tensor on ``device``; floating inputs cast to ``dtype`` (labels pass ``None`` and become int64)."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if dtype is None:
        return t.to(device=device, dtype=torch.int64)
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def _stack(states: Sequence[State], names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Named tensors with a leading institution axis, from flat numpy states."""
    return {k: torch.as_tensor(np.stack([np.asarray(s[k], dtype=np.float32) for s in states])).to(device) for k in names}


def train_many(
    model: nn.Module,
    starts: Sequence[State],
    shards_xy: Sequence[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    keys: Sequence[tuple[int, ...]],
    *,
    training: TrainingSpec,
    mu: float = 0.0,
    anchors: Sequence[State | None] | None = None,
    max_batch: int = MAX_BATCH,
    max_steps: Sequence[int | None] | None = None,
) -> list[Result]:
    """Local training of every institution k from ``starts[k]`` on ``shards_xy[k]`` with key ``keys[k]``, batched.

    Returns what ``set_state(model, starts[k]); local_train(...); get_state(model)`` would,
    per institution and in input order, with ``local_train``'s terms ``[Pull(mu, anchors[k])]``: a proximal
    pull of weight ``mu`` towards ``anchors[k]`` (None: the start). ``max_steps[k]`` cuts institution k's minibatches short as ``local_train``'s
    ``max_steps`` does (a partial straggler; None: all). ``model`` supplies the architecture,
    device, and values of keys a start omits; it is not changed. Call only when :func:`batchable` is True.
    """
    if not (len(starts) == len(shards_xy) == len(keys)) or (anchors is not None and len(anchors) != len(starts)):
        raise ValueError("train_many: starts, shards_xy, keys (and anchors) must have one entry per institution")
    base = get_state(model)
    full = [base | {k: np.asarray(v) for k, v in s.items()} for s in starts]  # set_state keeps omitted keys
    sizes = [len(y) for _, y in shards_xy]
    caps = max_steps if max_steps is not None else [None] * len(starts)
    plans = [_steps_of(key, n, training)[:cap] if n else [] for key, n, cap in zip(keys, sizes, caps)]
    results: list[Result | None] = [None] * len(starts)
    # Group institutions with similar step counts so few of a chunk's steps are spent on frozen ones.
    order = sorted(range(len(starts)), key=lambda i: len(plans[i]))
    for chunk in _chunks(order, [len(p) for p in plans], max(1, int(max_batch))):
        idle = [i for i in chunk if not plans[i]]  # empty shard or no epochs: local_train returns (nan, 0)
        for i in idle:
            results[i] = ({k: v.astype(np.float32, copy=True) for k, v in full[i].items()}, float("nan"), 0)
        busy = [i for i in chunk if plans[i]]
        if busy:
            out = _train_chunk(
                model,
                [full[i] for i in busy],
                [shards_xy[i] for i in busy],
                [plans[i] for i in busy],
                [None if anchors is None else anchors[i] for i in busy],
                training=training,
                mu=mu,
            )
            for i, r in zip(busy, out):
                results[i] = r
    return results  # type: ignore[return-value]


PADDED_PER_STEP = 200
"""How many padded (institution, step) slots of a batched call cost about as much as one step of it: a chunk's
minibatch index, masks and loss buffers hold one slot per institution and step of its longest plan (measured: 0.34
us a slot, against 60 to 70 us a step of a small model)."""


def _chunks(order: Sequence[int], steps: Sequence[int], size: int) -> list[list[int]]:
    """``order`` (ascending step counts) cut into the runs trained as one batched call each: at most ``size``
    institutions, and a new run where padding the run so far up to the next institution's step count costs more
    slots than :data:`PADDED_PER_STEP` times the steps a call of its own adds. One institution of a power-law
    population may hold a fifth of the data: it trains alone, not padding a hundred small ones to its 965 steps. An
    institution's numbers do not depend on who shares its call (tested), so the cut changes no number."""
    runs: list[list[int]] = []
    for i in order:
        run = runs[-1] if runs else None
        if run is None or len(run) == size or len(run) * (steps[i] - steps[run[-1]]) > PADDED_PER_STEP * steps[run[-1]]:
            runs.append([i])
        else:
            run.append(i)
    return runs


def _linear_stack(model: nn.Module) -> bool:
    """Whether ``model`` is a flat Sequential of Linear layers, element-wise activations and a leading Flatten."""
    if type(model) is not nn.Sequential:
        return False
    for i, m in enumerate(model):
        flatten_first = i == 0 and type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1
        if not (flatten_first or type(m) is nn.Linear or type(m) in _ELEMENTWISE):
            return False
    return True


def _single_linear(model: nn.Module) -> str | None:
    """The name of the Linear layer of a linear stack that is one Linear layer (logistic regression), else None."""
    if not _linear_stack(model):
        return None
    layers = [name for name, m in model.named_children() if type(m) is not nn.Flatten]
    return layers[0] if len(layers) == 1 and type(model.get_submodule(layers[0])) is nn.Linear else None


def _stacked_forward(model: nn.Sequential, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits (A, b, classes) of A institutions' own weights (leading axis A) on their batches x (A, b, features).

    A Linear layer is one batched matrix product (``baddbmm``) of each institution's rows with its
    own weight; activations apply element-wise; the leading Flatten is done on the data beforehand.
    Ordinary autograd then gives each institution its own gradient, with none of vmap's per-call cost.
    """
    for name, m in model.named_children():
        if type(m) is nn.Linear:
            w, b = weights[f"{name}.weight"].transpose(1, 2), weights.get(f"{name}.bias")
            x = torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)
        elif type(m) is not nn.Flatten:
            x = m(x)
    return x


def _train_chunk(
    model: nn.Module,
    starts: Sequence[dict[str, np.ndarray]],
    shards_xy: Sequence[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    plans: Sequence[list[np.ndarray]],
    anchors: Sequence[State | None],
    *,
    training: TrainingSpec,
    mu: float,
) -> list[Result]:
    """One batched run over institutions that all have at least one step.

    Institutions are ordered by step count, so the ones still training at step t are a
    suffix of the chunk: a linear stack trains that suffix alone (a slice of the stacked
    tensors, updated in place), so finished institutions cost nothing.
    """
    stack = _linear_stack(model)
    if not stack and len(starts) == 1:
        # A vmapped convolution over one institution is a plain one, whose rounding differs from the grouped one it
        # is over two or more: a lone institution trains beside a copy of itself, so hosts never change its numbers.
        return _train_chunk(model, [*starts, *starts], [*shards_xy, *shards_xy], [*plans, *plans], [*anchors, *anchors],
                            training=training, mu=mu)[:1]
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    order = sorted(range(len(starts)), key=lambda i: len(plans[i]))  # stable: ties keep their input order
    starts, shards_xy = [starts[i] for i in order], [shards_xy[i] for i in order]
    plans, anchors = [plans[i] for i in order], [anchors[i] for i in order]
    K, bs = len(starts), max(1, int(training.batch_size))
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]  # torch.optim.SGD never sees these

    # 1. Data: every shard in one flat tensor; a minibatch is a (K, bs) gather of global row numbers.
    xs = [_as_tensor(x, device, dtype) for x, _ in shards_xy]
    ys = [_as_tensor(y, device, None) for _, y in shards_xy]
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    if stack and type(model[0]) is nn.Flatten:
        x_all = x_all.flatten(1)
    offsets = np.cumsum([0] + [len(y) for y in ys[:-1]])
    lengths = np.array([len(p) for p in plans])
    S = int(lengths.max())
    # Padding points at a real row of its own shard; the mask zeroes it out. Every batch's rows land in one scatter.
    index = np.broadcast_to(offsets.reshape(K, 1, 1), (K, S, bs)).copy()
    valid = np.zeros((K, S, bs), dtype=bool)
    batches = [b for steps in plans for b in steps]
    rows = np.fromiter(map(len, batches), dtype=np.int64, count=len(batches))  # rows of each batch
    step_of = np.concatenate([np.arange(n) for n in lengths])  # each batch's step number
    k_of = np.repeat(np.arange(K), lengths)
    first = np.cumsum(rows) - rows
    at = np.repeat(np.arange(len(batches)), rows)  # each sampled row's batch
    where = (k_of[at], step_of[at], np.arange(int(rows.sum())) - first[at])
    index[where] = offsets[k_of[at]] + np.concatenate(batches)
    valid[where] = True
    index_t = torch.from_numpy(index).to(device)
    mask_t = torch.from_numpy(valid).to(device=device, dtype=dtype)
    counts = valid.sum(axis=2)  # (K, S) samples per step, 0 once an institution is done
    live_from = np.searchsorted(lengths, np.arange(S), side="right")  # step t trains institutions live_from[t]..K-1

    # 2. Stacked state: trainable parameters, frozen ones, and the FedProx anchors with a per-key flag.
    params = _stack(starts, trainable, device)
    fixed = _stack(starts, frozen, device)
    mu = float(mu)
    pull: dict[str, torch.Tensor] = {}
    flag: dict[str, torch.Tensor] = {}
    if mu > 0:
        # local_train pulls only the parameters the anchor names (default: all, towards the start).
        sources = [a if a is not None else s for a, s in zip(anchors, starts)]
        for name in trainable:
            has = [name in src for src in sources]
            if any(has):
                pull[name] = torch.as_tensor(np.stack([
                    np.asarray(src[name] if h else s[name], dtype=np.float32) for src, s, h in zip(sources, starts, has)
                ])).to(device=device, dtype=dtype)
                flag[name] = torch.tensor(has, dtype=dtype, device=device)

    def data_loss(logits, yb, m):
        """Masked mean cross-entropy of each institution's batch (padding rows weigh 0)."""
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="none")
        return (ce.view(m.shape) * m).sum(-1) / m.sum(-1).clamp(min=1.0)

    def prox(p, a, fl):
        """Each of A institutions' proximal terms 0.5 * mu * sum over anchored keys of ||p - anchor||^2: shape (A,)."""
        return 0.5 * mu * sum(fl[k] * ((p[k] - a[k]) ** 2).flatten(1).sum(1) for k in a)

    linear = _single_linear(model)
    if linear is not None:
        # Each valid row's share of its batch's mean, for every step at once; and where each step's log-probability
        # of the true label goes, so the data losses are summed after the loop in one pass.
        count_all = mask_t.sum(-1).clamp(min=1.0)  # (K, S)
        share_t = (mask_t / count_all.unsqueeze(-1)).unsqueeze(-1)  # (K, S, bs, 1)
        picked = torch.zeros(S, K, bs, dtype=dtype, device=device)

        def step(p, f, xb, yb, weight, a, fl, out):
            """Gradients of A institutions' losses in closed form (softmax minus one-hot); ``out`` gets each row's
            log-probability of its label (the data loss is summed from it after the loop).

            Logistic regression's gradient needs no autograd graph: d(mean CE)/d(logits) is
            (softmax - onehot) / count on valid rows, and the weight's gradient is its product with
            the batch. About half the time of the autograd step, and equal to it to float32 rounding.
            """
            both = {**p, **f}
            w, b = both[f"{linear}.weight"], both.get(f"{linear}.bias")
            logits = torch.bmm(xb, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), xb, w.transpose(1, 2))
            logp = torch.log_softmax(logits, -1)
            label = yb.unsqueeze(-1)
            out.copy_(logp.gather(-1, label).squeeze(-1))
            g = logp.exp_().mul_(weight).scatter_add_(-1, label, -weight)  # d loss / d logits
            grads = {}
            if f"{linear}.weight" in p:
                grads[f"{linear}.weight"] = torch.bmm(g.transpose(1, 2), xb)
            if f"{linear}.bias" in p:
                grads[f"{linear}.bias"] = g.sum(1)
            for k in a:  # the proximal term's gradient, mu * (p - anchor) on anchored keys
                grads[k] = grads[k] + mu * fl[k].view(-1, *([1] * (p[k].dim() - 1))) * (p[k] - a[k])
            return grads
    elif stack:
        def step(p, f, xb, yb, m, a, fl):
            """Gradients of A institutions' losses by ordinary autograd through the stacked forward; aux: data losses."""
            leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
            data = data_loss(_stacked_forward(model, {**leaves, **f}, xb), yb, m)
            loss = data.sum() + (prox(leaves, a, fl).sum() if a else 0.0)  # institutions' losses are independent
            grads = torch.autograd.grad(loss, list(leaves.values()))
            return dict(zip(leaves, grads)), data.detach()
    else:
        def loss_fn(p, f, xb, yb, m, a, fl):
            """One institution's masked mean cross-entropy plus its proximal term; aux: the data loss."""
            logits = torch.func.functional_call(model, {**p, **f}, (xb,))
            data = (F.cross_entropy(logits, yb, reduction="none") * m).sum() / m.sum().clamp(min=1.0)
            loss = data
            if a:
                loss = loss + 0.5 * mu * sum(fl[k] * ((p[k] - a[k]) ** 2).sum() for k in a)
            return loss, data

        vstep = torch.vmap(torch.func.grad_and_value(loss_fn, has_aux=True))

        def step(p, f, xb, yb, m, a, fl):
            grads, (_, data) = vstep(p, f, xb, yb, m, a, fl)
            return grads, data

    # 3. SGD written out as torch.optim.SGD does it. A linear stack trains the institutions still training (a
    #    suffix) and updates them in place; the vmapped step keeps every institution in the call and freezes the
    #    finished ones (a vmapped convolution is a grouped one, whose rounding changes with the number of groups).
    lr, wd, mom = float(training.lr), float(training.weight_decay), float(training.momentum)
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}  # m*0 + d == d: the first step's buf = d
    # Each step's mean data loss, 0 once done (the closed-form step sums it after the loop instead).
    step_loss = torch.zeros(S, K, dtype=dtype, device=device) if linear is None else None
    active_t = torch.from_numpy(counts > 0).to(device)
    # The closed-form step needs no graph: the whole loop runs without one. The others build a graph per step and
    # update under no_grad.
    outer = torch.no_grad() if linear is not None else contextlib.nullcontext()
    update = contextlib.nullcontext() if linear is not None else torch.no_grad()
    views: dict[int, tuple[dict[str, torch.Tensor], ...]] = {}  # the suffix's slices, made once per suffix
    for t in range(S):
        lo = int(live_from[t]) if stack else 0
        if lo not in views or not stack:  # the vmapped path replaces params each step: no slices to keep
            views[lo] = tuple({k: v[lo:] for k, v in d.items()} for d in (params, fixed, pull, flag))
        p_lo, f_lo, pull_lo, flag_lo = views[lo]
        idx = index_t[lo:, t]
        xb, yb = x_all[idx], y_all[idx]
        with outer:
            if linear is not None:
                grads = step(p_lo, f_lo, xb, yb, share_t[lo:, t], pull_lo, flag_lo, picked[t, lo:])
            else:
                grads, data = step(p_lo, f_lo, xb, yb, mask_t[lo:, t], pull_lo, flag_lo)
                step_loss[t, lo:] = data.detach()
        with outer, update:
            for k, p in params.items():
                live = p_lo[k]
                d = grads[k].add(live, alpha=wd) if wd != 0 else grads[k]
                if stack:
                    if mom != 0:
                        d = bufs[k][lo:].mul_(mom).add_(d)
                    live.add_(d, alpha=-lr)
                    continue
                gate = active_t[:, t].view(-1, *([1] * (p.dim() - 1)))  # broadcast over the parameter's own axes
                if mom != 0:
                    bufs[k] = torch.where(gate, bufs[k].mul(mom).add(d), bufs[k])
                    d = bufs[k]
                params[k] = torch.where(gate, p.add(d, alpha=-lr), p)

    if linear is not None:  # each step's masked mean cross-entropy, as the autograd step computes it
        step_loss = -(picked * mask_t.transpose(0, 1)).sum(-1) / count_all.T

    # 4. Back to numpy states named like get_state, in the model's state_dict order and the caller's order.
    # Mean per-sample loss: each step's mean times its samples, summed exactly (fsum) in float64, so no other
    # institution's step count changes the sum's rounding.
    weighted = step_loss.T.cpu().double().numpy() * counts
    losses = [math.fsum(weighted[k, : lengths[k]]) / counts[k].sum() for k in range(K)]
    out_p = {k: v.detach().cpu().float().numpy() for k, v in params.items()}
    results: list[Result | None] = [None] * K
    for k in range(K):
        state = {name: (out_p[name][k].copy() if name in out_p else np.asarray(starts[k][name], dtype=np.float32).copy())
                 for name in starts[k]}
        results[order[k]] = (state, float(losses[k]), len(plans[k]))
    return results  # type: ignore[return-value]


EVAL_ROWS = 8192  # rows per forward pass when many institutions' sets are scored at once: bounds one pass's memory

_VECTOR_BYTES = {"AVX512": 64, "AVX2": 32, "DEFAULT": 32}  # x86 CPU kernels' vector width, by ATen's capability
_ROW_BLOCK = 64  # rows padded to a multiple of this: every row in a full vector whatever the width


@functools.cache
def _vector_bytes() -> int:
    """The vector width (bytes) of ATen's CPU kernels here, 0 where :func:`cross_entropy_rows` has not been checked."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    return _VECTOR_BYTES.get(torch.backends.cpu.get_cpu_capability(), 0)


def cross_entropy_rows(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, y, reduction="none")``, bit for bit, about 8 times faster on a CPU for few classes.

    For each row, ATen's CPU log-softmax over the last dimension takes the row's maximum, sums
    ``exp(x - max)`` lane by lane in class order when the classes fit in one vector, takes the
    log and subtracts; over the first dimension it does the same arithmetic with the same
    vector exp and log, one row per lane, so thousands of rows cost a few vector operations
    per class instead of a dozen per row. Rows are padded to whole vectors (a partial vector's
    lanes fall back to the C library's exp). Elsewhere (more classes than one vector holds,
    other dtypes and devices, other CPUs), the library's own call. ``tests/sim/test_batched.py``
    checks the identity for every class count and row count that takes this path.
    """
    n, classes = logits.shape
    lanes = _vector_bytes() // logits.element_size()
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float64) or not classes < lanes:
        return F.cross_entropy(logits, y, reduction="none")
    by_class = F.pad(logits.T, (0, -n % _ROW_BLOCK))  # (classes, rows padded), contiguous
    return -torch.log_softmax(by_class, 0).gather(0, y[None, :]).squeeze(0)


def scorable(model: nn.Module, precision: str) -> bool:
    """Whether :func:`evaluate_many` can score this model (a float32 linear stack, fp32 forward passes)."""
    params = list(model.parameters())
    return (_linear_stack(model) and bool(params) and all(p.dtype == torch.float32 for p in params)
            and not list(model.buffers()) and precision == "fp32")


class ScoringRows:
    """Many institutions' scoring sets (test, validation) as one tensor, built once and scored in few passes.

    A host scores the same sets every round: their rows are concatenated once (a subset is a gather of
    row ranges), and scoring everyone is a forward pass over all rows in chunks of :data:`EVAL_ROWS`,
    whatever the number of institutions, followed by sums per set (``numpy.bincount``, in row order,
    in float64). A linear stack computes each row on its own (a matrix product's row does not depend
    on the other rows: checked against the one-set-at-a-time pass in ``tests/sim/test_batched.py``),
    so a set's numbers do not depend on which other sets are scored with it.
    """

    def __init__(self, sets: Sequence[tuple[np.ndarray, np.ndarray]], device: torch.device, dtype: torch.dtype):
        self.sizes = np.array([len(y) for _, y in sets], dtype=np.int64)
        self.offsets = np.cumsum(self.sizes) - self.sizes
        busy = [s for s in sets if len(s[1])]
        self.x = torch.cat([_as_tensor(x, device, dtype) for x, _ in busy]) if busy else None
        self.y = torch.cat([_as_tensor(y, device, None) for _, y in busy]) if busy else None
        self.owner = np.repeat(np.arange(len(sets), dtype=np.int64), self.sizes)

    def score(self, model: nn.Module, picked: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(accuracy, mean cross-entropy, right answers, summed cross-entropy) arrays of ``model`` on each set (only
        those at positions ``picked``, in that order); NaN accuracy and loss for an empty set. The sums (float64) let a
        caller pool sets exactly: the union's accuracy is the summed right answers over the summed sizes."""
        sizes = self.sizes if picked is None else self.sizes[picked]
        k = len(sizes)
        acc, loss = np.full(k, np.nan), np.full(k, np.nan)
        if self.x is None or not sizes.sum():
            return acc, loss, np.zeros(k), np.zeros(k)
        if picked is None:
            x, y, owner = self.x, self.y, self.owner
        else:  # the picked sets' row ranges, in the picked order
            starts = np.repeat(self.offsets[picked] - (np.cumsum(sizes) - sizes), sizes)
            rows = torch.from_numpy(starts + np.arange(int(sizes.sum()), dtype=np.int64)).to(self.x.device)
            x, y, owner = self.x[rows], self.y[rows], np.repeat(np.arange(k, dtype=np.int64), sizes)
        ce, hit = [], []
        with torch.inference_mode():
            for lo in range(0, len(y), EVAL_ROWS):
                logits = model(x[lo : lo + EVAL_ROWS])
                yb = y[lo : lo + EVAL_ROWS]
                ce.append(cross_entropy_rows(logits, yb))
                hit.append(logits.argmax(dim=1) == yb)
        ce_np = torch.cat(ce).double().cpu().numpy()
        right = np.bincount(owner, weights=torch.cat(hit).cpu().numpy(), minlength=k)
        total = np.bincount(owner, weights=ce_np, minlength=k)
        busy = sizes > 0
        acc[busy], loss[busy] = right[busy] / sizes[busy], total[busy] / sizes[busy]
        return acc, loss, right, total


def evaluate_many(model: nn.Module, sets: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, float]]:
    """(accuracy, mean cross-entropy) of ``model`` on each of ``sets``, as ``sim.core.train.evaluate`` gives them, at once
    (:class:`ScoringRows`; a host keeps one and scores it every round). Call only when :func:`scorable` is True; an
    empty set scores NaN."""
    first = next(model.parameters())
    acc, loss, _, _ = ScoringRows(sets, first.device, first.dtype).score(model)
    return [(float(a), float(b)) for a, b in zip(acc, loss)]
