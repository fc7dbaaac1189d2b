"""Foundation models: seeded builds, adapter-only state, adapter swapping, pre-run checks, mixed precision."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sim.cli import compose
from sim.checks import load_spec
from sim.core.models import build_model, get_state, model_flops, set_state
from sim.core.models.foundation import check_config, load_tokenizer, minilm_path
from sim.core.train import evaluate, full_gradient, local_train
from sim.core.types import ConfigError, LocalPlan, TrainingSpec, state_nbytes

L, C = 16, 3  # token length and classes: small enough that a tiny step takes milliseconds
TINY = {"_target_": "sim.core.models.foundation.tiny_transformer", "lora": {"r": 4, "alpha": 8}}
MINILM = {"_target_": "sim.core.models.foundation.minilm"}
SPEC = TrainingSpec(lr=0.5, batch_size=8, local_epochs=1)  # a large lr so one step visibly moves every trainable value


def ids(seed: int, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids (no pad id 0) with a few trailing pads, and random labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 1000, size=(n, L), dtype=np.int64)
    x[:, L - 3 :] = 0  # padding, as the text datasets produce it
    return x, rng.integers(0, C, size=n)


def tiny(seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny transformer, LoRA by default."""
    return build_model({**TINY, **overrides}, (L,), C, seed=seed)


def full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every state_dict entry, cloned (frozen ones included)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_builds_deterministically_and_seeds_differ() -> None:
    # Execute
    a, b, c = get_state(tiny(3)), get_state(tiny(3)), get_state(tiny(4))
    lora_a = next(k for k in a if "lora_A" in k)
    # Assert: same seed, same values (LoRA's A matrices are random); another seed, other values
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.abs(a[lora_a]).sum() > 0 and not np.array_equal(a[lora_a], c[lora_a])


def test_lora_state_is_adapters_and_head_only_and_tiny_in_bytes() -> None:
    # Execute
    lora, none, frozen = (get_state(tiny(adapter=a)) for a in ("lora", "none", "frozen"))
    # Assert: LoRA ships adapters and the head, frozen the head alone, none everything
    assert all("lora_" in k or ".classifier." in k for k in lora)
    assert {k for k in lora if ".classifier." in k} and {k for k in lora if "lora_B" in k}
    assert all(".classifier." in k for k in frozen) and len(frozen) == 2
    assert any("word_embeddings" in k for k in none)
    assert state_nbytes(lora) * 100 < state_nbytes(none)  # ~4.5 kB vs ~4 MB: the embedding never crosses


def test_local_train_on_token_ids_changes_only_the_trainable_part() -> None:
    # Prepare
    model = tiny()
    before, x, y = full(model), *ids(0)
    # Execute
    loss, steps = local_train(model, x, y, training=SPEC, key=(0, 1, 1))
    after = full(model)
    # Assert: a real step; frozen keys bit-identical, every LoRA B (zero at start) and the head moved
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert np.isfinite(loss) and steps == 2
    assert changed and changed <= set(get_state(model)) and not changed & model.frozen_keys
    assert {k for k in get_state(model) if "lora_B" in k or "classifier" in k} <= changed


def test_set_state_swaps_adapters_in_one_model_like_separate_models() -> None:
    # Prepare: two institutions train their own copies from the same start on their own data
    separate = {}
    for inst in (1, 2):
        model = tiny()
        local_train(model, *ids(inst), training=SPEC, key=(0, inst, 1))
        separate[inst] = model.eval()
    shared = tiny().eval()
    base = {k: v for k, v in full(shared).items() if k in shared.frozen_keys}
    probe = torch.as_tensor(ids(9)[0])
    # Execute / Assert: swapping each one's state into one working model reproduces its logits exactly
    with torch.no_grad():
        for inst in (1, 2, 1):
            set_state(shared, get_state(separate[inst]))
            assert torch.equal(shared(probe), separate[inst](probe))
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in base.items())  # the base was never written


def test_full_gradient_names_match_the_state() -> None:
    # Prepare
    model = tiny()
    # Execute
    grads, loss = full_gradient(model, *ids(0))
    # Assert: FedSGD's payload has exactly the keys of the shared state
    assert set(grads) == set(get_state(model)) and np.isfinite(loss)


def test_model_flops_counts_linear_layers_per_token() -> None:
    # Prepare: hidden 32, 2 layers, intermediate 64, LoRA r=4 on query and value (conf defaults of the factory)
    h, layers, inter, r = 32, 2, 64, 4
    per_token = layers * (4 * h * h + 2 * h * inter) + layers * 2 * r * (h + h)  # q,k,v,out + FFN + LoRA A,B
    # Execute
    flops = model_flops(tiny(), (L,))
    # Assert: per-token Linears times L, plus pooler and classifier on the [CLS] vector once
    assert flops == L * per_token + h * h + h * C


def test_minilm_loads_and_a_step_moves_only_adapters_and_head() -> None:
    # Prepare
    model = build_model(MINILM, (L,), C, seed=0)
    before, x, y = full(model), *ids(0, n=8)
    # Execute
    local_train(model, x, y, training=SPEC, key=(0, 0, 1))
    # Assert: the real weights were loaded (not a random init), and only the shared part moved
    assert model.model.base_model.model.config.hidden_size == 384
    word = next(k for k in before if k.endswith("word_embeddings.weight"))
    assert float(before[word].std()) > 0.03  # MiniLM's trained embedding; BERT's random init has std 0.02
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed and all("lora_" in k or ".classifier." in k for k in changed)


def test_minilm_state_bytes_by_adapter() -> None:
    # Execute
    nbytes = {a: state_nbytes(get_state(build_model({**MINILM, "adapter": a}, (L,), C, seed=0))) for a in ("lora", "none", "frozen")}
    # Assert: LoRA r=8 on query/value = 6 layers x 2 x 8 x (384+384) values + a 384x3 head; frozen is the head only
    assert nbytes["lora"] == 4 * (6 * 2 * 8 * 768 + 384 * C + C)
    assert nbytes["frozen"] == 4 * (384 * C + C)
    assert nbytes["none"] > 80 * 2**20  # the whole 22.7M-parameter model


@pytest.mark.parametrize("cfg, key, words", [
    ({"_target_": "sim.core.models.foundation.hf", "path": "/no/such/dir"}, "model.path", "hf download"),
    ({"_target_": "sim.core.models.foundation.hf", "path": "sentence-transformers/all-MiniLM-L6-v2"}, "model.path", "hub name"),
    ({"_target_": "sim.core.models.foundation.hf", "path": None}, "model.path", "not set"),
    ({**MINILM, "lora": {"target_modules": ["qkv"]}}, "model.lora.target_modules", "query"),
    ({**MINILM, "lora": {"target_modules": ["LayerNorm"]}}, "model.lora.target_modules", "cannot wrap"),
    ({**MINILM, "lora": {"rank": 4}}, "model.lora.rank", "unknown key"),
    ({**MINILM, "adapter": "prefix"}, "model.adapter", "lora, none, frozen"),
    ({**TINY, "hidden": 30, "heads": 4}, "model.heads", "multiple"),
])
def test_bad_model_configs_fail_before_the_run_naming_the_key(cfg: dict, key: str, words: str) -> None:
    # Execute
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    # Assert: one line, the right key, the fix
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


def test_folder_without_config_json_is_refused_by_check_and_build(tmp_path: Path) -> None:
    # Prepare
    cfg = {"_target_": "sim.core.models.foundation.hf", "path": str(tmp_path)}
    # Execute / Assert: the pre-run check and the factory say the same
    for attempt in (lambda: check_config(cfg), lambda: build_model(cfg, (L,), C, seed=0)):
        with pytest.raises(ConfigError, match="config.json") as err:
            attempt()
        assert err.value.key == "model.path"


def test_a_model_folder_without_tokenizer_files_is_refused_naming_them(tmp_path: Path) -> None:
    # Prepare: MiniLM's config and weights without its tokenizer (transformers would make a 5-token vocabulary of it)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(minilm_path() / name)
    cfg = {"_target_": "sim.core.models.foundation.hf", "path": str(tmp_path), "adapter": "frozen"}
    # Execute / Assert: the pre-run check and the data's tokenizer refuse it in one line naming the files
    for attempt in (lambda: check_config(cfg), lambda: load_tokenizer(cfg)):
        with pytest.raises(ConfigError) as err:
            attempt()
        assert err.value.key == "model.path" and "has no tokenizer files (missing: tokenizer.json, vocab.txt" in str(err.value)
    (tmp_path / "vocab.json").write_text("{}")  # half a BPE tokenizer: the other half is named
    with pytest.raises(ConfigError, match=r"missing: merges.txt \(beside its vocab.json\)"):
        check_config(cfg)


def test_hf_loads_a_local_folder() -> None:
    # Prepare
    cfg = {"_target_": "sim.core.models.foundation.hf", "path": str(minilm_path()), "adapter": "frozen"}
    # Execute
    check_config(cfg)
    model = build_model(cfg, (L,), C, seed=0)
    # Assert
    assert model(torch.as_tensor(ids(0)[0])).shape == (16, C) and len(get_state(model)) == 2


def test_load_spec_runs_the_foundation_checks(small_cfg, tmp_path: Path) -> None:
    # Prepare: a small text file for a scenario without feature skew (token ids cannot be shifted)
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "".join(f"word{i} text,{i % 2}\n" for i in range(160)))
    text = ["scenario=docstrings", "data=text", f"data.path={csv}", "data.partition=iid", "data.institution_column=null"]
    # Execute / Assert: a good tiny config passes; bad LoRA targets and numeric data fail in the driver with their key
    load_spec(compose("config", ["smoke=true", "model=tiny_transformer", *text]))
    with pytest.raises(ConfigError) as err:
        load_spec(compose("config", ["smoke=true", "model=minilm", "model.lora.target_modules=[qkv]", *text]))
    assert err.value.key == "model.lora.target_modules"
    with pytest.raises(ConfigError, match="takes token ids") as err:
        load_spec(small_cfg("model=tiny_transformer"))
    assert err.value.key == "model"


def test_bf16_autocast_trains_on_cpu_and_fp16_falls_back_to_fp32() -> None:
    # Prepare
    models = {p: tiny() for p in ("bf16", "fp16", "fp32")}
    x, y = ids(0)
    # Execute
    losses = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for p, model in models.items():
            losses[p], _ = local_train(model, x, y, training=TrainingSpec(local_epochs=1, lr=0.5, batch_size=8, precision=p), key=(0, 0, 1))
        acc, loss = evaluate(models["bf16"], x, y, precision="bf16")
    # Assert: bf16 trains (close to fp32, not equal); fp16 on CPU warns and is exactly fp32
    s16, s32, sbf = (get_state(models[p]) for p in ("fp16", "fp32", "bf16"))
    assert any("fp16 needs a GPU" in str(w.message) for w in caught)
    from sim.core.train import native_bf16  # bf16 on a CPU that lacks it natively is slow: said once, not silently
    assert any("bf16 on a CPU without native bf16" in str(w.message) for w in caught) != native_bf16()
    assert all(np.array_equal(s16[k], s32[k]) for k in s32) and losses["fp16"] == losses["fp32"]
    assert np.isfinite(losses["bf16"]) and abs(losses["bf16"] - losses["fp32"]) < 0.1 and np.isfinite(loss)
    assert any(not np.array_equal(sbf[k], s32[k]) for k in s32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_trains_minilm_on_a_gpu(precision: str) -> None:
    # Prepare
    model = build_model(MINILM, (L,), C, seed=0).cuda()
    before, (x, y) = get_state(model), ids(0)
    # Execute: fp16 goes through the GradScaler, bf16 without one
    loss, _ = local_train(model, x, y, training=TrainingSpec(local_epochs=1, lr=0.5, batch_size=8, precision=precision), key=(0, 0, 1))
    # Assert: finite loss; the fp32 master weights moved
    after = get_state(model)
    assert np.isfinite(loss) and any(not np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_minilm_on_a_gpu_repeats_bit_for_bit(precision: str) -> None:
    # Prepare: what a GPU host switches on (attention's fused kernels' backward passes are not deterministic)
    from sim.core.train import deterministic_cuda

    deterministic_cuda()
    x, y = ids(0, n=32)
    # Execute: the same weights, data and key twice
    states = []
    for _ in range(2):
        model = build_model(MINILM, (L,), C, seed=0).cuda()
        local_train(model, x, y, training=TrainingSpec(local_epochs=1, lr=0.05, batch_size=8, precision=precision), key=(0, 0, 1))
        states.append(get_state(model))
    # Assert: bit for bit
    assert all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
