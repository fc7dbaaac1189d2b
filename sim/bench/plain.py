"""The plain baselines: the same work as collabsim, written as the shortest single-process PyTorch loops.

``plain_fedavg`` reads the run config through collabsim's public loaders only so that
data, initial weights, cohorts and local steps are the same (shards from
``build_federation``, the model from ``build_model``, cohorts from ``sample_cohort``,
minibatch order from ``rng_for`` as an institution draws it); everything after that is
a bare loop: copy the global weights in, SGD over shuffled minibatches, a sample-weighted
mean, score the global model on the global test set. ``plain_lora`` is the same idea for
one MiniLM+LoRA local step with transformers and peft directly.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from agents.schemes.base import sample_cohort
from sim.bench.measure import PeakRSS
from sim.core.types import RoundContext

COLLAB_KEY = (0, 0, 1)  # RNG key of the timed collabsim step: it fixes the batch order both loops follow
LORA = dict(r=8, lora_alpha=16, target_modules=["query", "value"])  # what the foundation factory's adapter=lora means


def plain_fedavg(cfg: Any) -> dict[str, float]:
    """FedAvg by sample count on a composed run config; seconds (start-up, round loop, total), peak RSS, final accuracy."""
    from sim.checks import load_spec
    from sim.core.data import build_federation
    from sim.core.models import build_model
    from sim.core.train import rng_for

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        spec = load_spec(cfg)
        fed = build_federation(spec.data, spec.scenario, spec.seed, smoke=spec.smoke, model=spec.model)
        model = build_model(spec.model, fed.input_shape, fed.num_classes, seed=spec.seed)
        params = list(model.parameters())
        glob = [p.detach().clone() for p in params]
        tr, names = spec.training, spec.scenario.names
        position = {name: k for k, name in enumerate(names)}
        fraction = float(spec.scheme.get("cohort_fraction", 1.0))
        x_test, y_test = torch.from_numpy(fed.x_test), torch.from_numpy(fed.y_test)
        torch.optim.SGD(params, lr=tr.lr)  # the first optimizer imports torch's compiler stack (seconds): start-up, not round 1
        t1 = time.perf_counter()
        accuracy = float("nan")
        for r in range(1, spec.rounds + 1):
            cohort = sample_cohort(RoundContext(round=r, seed=spec.seed, cohort=names), fraction)
            sums, total = [torch.zeros_like(p, dtype=torch.float64) for p in params], 0
            for name in cohort:
                k = position[name]
                shard = fed.shards[k]
                x, y, n = torch.from_numpy(shard.x_train), torch.from_numpy(shard.y_train), shard.num_train
                with torch.no_grad():
                    for p, g in zip(params, glob):
                        p.copy_(g)
                opt = torch.optim.SGD(params, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay)
                order, _ = rng_for((spec.seed, k, r))  # the institution's own stream: the same minibatches
                for _ in range(tr.local_epochs):
                    perm = torch.from_numpy(order.permutation(n))
                    for i in range(0, n, tr.batch_size):
                        idx = perm[i : i + tr.batch_size]
                        opt.zero_grad()
                        F.cross_entropy(model(x[idx]), y[idx]).backward()
                        opt.step()
                for s, p in zip(sums, params):
                    s += n * p.detach().double()
                total += n
            if total:
                glob = [(s / total).float() for s in sums]
            with torch.no_grad():
                for p, g in zip(params, glob):
                    p.copy_(g)
                accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
        t2 = time.perf_counter()
    return {"total_s": t2 - t0, "startup_s": t1 - t0, "loop_s": t2 - t1, "round_s": (t2 - t1) / spec.rounds,
            "peak_rss_mib": rss.peak_mib, "accuracy": accuracy, "rounds": spec.rounds}


def token_batches(vocab_size: int, steps: int, batch: int = 32, length: int = 32, seed: int = 0) -> np.ndarray:
    """``steps * batch`` rows of ``length`` random non-special token ids (no padding, so every token is attended)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1000, vocab_size, size=(steps * batch, length), dtype=np.int64)


def plain_lora(x: np.ndarray, y: np.ndarray, num_labels: int, lr: float, batch: int = 32, layers: int = 2,
               score_batch: int = 256) -> dict[str, float]:
    """AutoModelForSequenceClassification + LoRA in the top ``layers`` layers, one SGD step per batch, every layer run
    every step (no stored states); training and scoring samples/s after one warm-up step.

    Rows are taken in the order ``local_train`` draws them for key (0, 0, 1), so both loops see the same batches.
    """
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from sim.core.models.foundation import _quiet, minilm_path
    from sim.core.train import rng_for

    transformers.logging.set_verbosity_error()  # the new head's load report would land in the printed table
    with _quiet(), warnings.catch_warnings():  # load bars and peft's deprecation notes, likewise
        warnings.simplefilter("ignore", FutureWarning)
        base = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=num_labels,
                                                                  local_files_only=True)
        depth = base.config.num_hidden_layers
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **LORA,
                                                layers_to_transform=list(range(depth - layers, depth))))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = rng_for(COLLAB_KEY)[0].permutation(len(y))
    xt, yt = torch.from_numpy(x[order]), torch.from_numpy(y[order])

    def step(i: int) -> None:
        opt.zero_grad()
        F.cross_entropy(model(input_ids=xt[i : i + batch]).logits, yt[i : i + batch]).backward()
        opt.step()

    step(0)  # warm-up: first-call allocations are start-up, not throughput
    t0 = time.perf_counter()
    for i in range(0, len(y), batch):
        step(i)
    seconds = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(y), score_batch):
            model(input_ids=xt[i : i + score_batch])
    scoring = time.perf_counter() - t0
    return {"seconds": seconds, "samples_per_s": len(y) / seconds, "score_samples_per_s": len(y) / scoring}


def collab_lora(model_cfg: Mapping[str, Any], x: np.ndarray, y: np.ndarray, num_labels: int, lr: float,
                batch: int = 32, score_batch: int = 256) -> dict[str, float]:
    """collabsim's local step (``sim.core.train.local_train``) on the foundation factory: the first epoch over the rows
    (which stores the frozen layers' outputs), a second (which reuses them), then scoring; and the largest difference
    between its logits and those of the same model with every layer run."""
    from sim.core.models import build_model
    from sim.core.train import evaluate, local_train
    from sim.core.types import TrainingSpec

    model = build_model(model_cfg, (x.shape[1],), num_labels, seed=0)
    training = TrainingSpec(local_epochs=1, batch_size=batch, lr=lr)
    local_train(model, x[:batch], y[:batch], training=training, key=(0, 0, 0))  # warm-up
    out = {}
    for name, key in (("first", COLLAB_KEY), ("reused", (0, 1, 1))):
        t0 = time.perf_counter()
        local_train(model, x, y, training=training, key=key)
        out[f"{name}_samples_per_s"] = len(y) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    evaluate(model, x, y, batch_size=score_batch)
    out["score_samples_per_s"] = len(y) / (time.perf_counter() - t0)
    model.eval()
    with torch.inference_mode():
        stored = model(torch.from_numpy(x[:64]))
        prefix, model.prefix = model.prefix, None
        whole = model(torch.from_numpy(x[:64]))
        model.prefix = prefix
    return out | {"samples_per_s": out["reused_samples_per_s"], "max_logit_diff": float((stored - whole).abs().max())}
