"""Frozen lower layers computed once: the same logits and gradients as the whole model, for less work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.checks import load_spec
from sim.cli import compose
from sim.core.data.text import tokenize
from sim.core.models.foundation import minilm
from sim.core.models.frozen import trim
from sim.core.train import evaluate
from sim.core.types import ConfigError

TEXTS = ["Compute the arithmetic mean along the given axis.", "Return a sparse matrix in CSR format.",
         "Graph.", "A class for holding an astronomical table with units and metadata, read from FITS files.",
         "Compute the arithmetic mean along the given axis."]  # a repeat: stored once


def ids() -> torch.Tensor:
    return torch.from_numpy(tokenize(TEXTS, {"_target_": "minilm"}, 32))


def plain(model):
    """The same model with every layer run (the stored states switched off)."""
    prefix, model.prefix = model.prefix, None
    return prefix


@pytest.fixture(scope="module")
def top2():
    torch.manual_seed(0)
    return minilm((32,), 4, lora={"layers": 2})


def test_stored_lower_layers_give_the_whole_models_logits_and_gradients(top2):
    # Prepare: adapters in the top 2 of MiniLM's 6 layers; the batch mixes lengths and repeats a text
    x, y = ids(), torch.tensor([0, 1, 2, 3, 0])
    top2.eval()  # dropout off: the stored states are computed without it
    before = len(top2.prefix.store)
    # Execute: logits and LoRA gradients with the stored states (twice: computed, then replayed), then without
    cached = [top2(x) for _ in range(2)]
    torch.nn.functional.cross_entropy(top2(x), y).backward()
    grads = {n: p.grad.clone() for n, p in top2.named_parameters() if p.requires_grad}
    top2.zero_grad()
    prefix = plain(top2)
    try:
        whole = top2(x)
        torch.nn.functional.cross_entropy(whole, y).backward()
        whole_grads = {n: p.grad.clone() for n, p in top2.named_parameters() if p.requires_grad}
    finally:
        top2.prefix = prefix
        top2.zero_grad()
    # Assert: the boundary sits under the first adapted layer, each distinct text is stored once, numbers agree
    assert prefix.boundary == 4 and len(prefix.store) - before == 4
    for logits in cached:
        assert torch.allclose(logits, whole, atol=1e-5)
    assert grads.keys() == whole_grads.keys() and any("lora" in n for n in grads)
    for name, g in grads.items():
        assert torch.allclose(g, whole_grads[name], atol=1e-5), name


def test_scoring_under_inference_mode_fills_a_store_that_training_can_use(tmp_path):
    # Prepare: a fresh model whose first sight of the texts is a scoring pass (inference mode)
    model = minilm((32,), 4, lora={"layers": 1})
    x, y = ids(), np.array([0, 1, 2, 3, 0])
    # Execute: score, then one training step over the same texts
    evaluate(model, x.numpy(), y)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.from_numpy(y)).backward()
    # Assert: the stored states served both, and the adapters got gradients
    assert all(x[i, : int((x[i] != model.pad_id).sum())].numpy().tobytes() in model.prefix.store for i in range(5))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_only_a_frozen_bottom_is_stored():
    # Execute: full fine-tuning, LoRA in every layer, and a frozen base with only the head training
    assert minilm((32,), 3, adapter="none").prefix is None
    assert minilm((32,), 3).prefix is None  # adapters in all 6 layers: nothing below them
    assert minilm((32,), 3, adapter="frozen").prefix.boundary == 6  # the whole encoder, once


def test_a_batch_is_cut_to_its_longest_text():
    x = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0]])
    assert trim(x, 0).tolist() == [[101, 7, 8, 102], [101, 9, 102, 0]]
    assert trim(x[:, :4], 0).shape == (2, 4)  # no column of padding only: unchanged


@pytest.mark.parametrize("layers, words", [(7, "must be in [1, 6] (the model's 6 layers), got 7"),
                                           (0, "model.lora.layers")])
def test_adapter_layers_beyond_the_model_are_refused_before_anything_runs(layers, words):
    with pytest.raises(ConfigError) as err:
        load_spec(compose("config", ["data=docstrings", "data.task=kind", "model=minilm", f"model.lora.layers={layers}"]))
    assert err.value.key == "model.lora.layers" and words in str(err.value) and "\n" not in str(err.value)


def test_models_built_anew_share_the_stored_states_only_when_their_frozen_layers_are_the_same():
    # Execute: two MiniLMs as two runs build them (other heads), one with a deeper bottom, two random tiny BERTs
    from sim.core.models.foundation import tiny_transformer

    a, b = minilm((32,), 4, lora={"layers": 1}), minilm((32,), 9, lora={"layers": 1})
    deeper = minilm((32,), 4, lora={"layers": 2})
    torch.manual_seed(1)
    tiny1 = tiny_transformer((32,), 4, adapter="frozen")
    torch.manual_seed(2)
    tiny2 = tiny_transformer((32,), 4, adapter="frozen")
    # Assert: the same pretrained bottom shares one store; a different bottom never does
    assert a.prefix.store is b.prefix.store
    assert deeper.prefix.store is not a.prefix.store and tiny1.prefix.store is not tiny2.prefix.store


def test_the_simulated_clock_counts_every_layer_whatever_the_process_stored_before():
    # Prepare: two models of one frozen bottom; the first probe stores the probe's states for both
    from sim.core.models import model_flops

    a, b = minilm((16,), 4, lora={"layers": 1}), minilm((16,), 4, lora={"layers": 1})
    # Execute
    first, second = model_flops(a, (16,)), model_flops(b, (16,))
    whole = model_flops(minilm((16,), 4), (16,))  # LoRA in every layer: nothing stored
    # Assert: the same count, the whole model's forward (LoRA's own small products aside)
    assert first == second and abs(first - whole) / whole < 0.01
