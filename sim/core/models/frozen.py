"""Frozen lower layers, computed once: a transformer whose bottom layers never train reuses their outputs.

With LoRA adapters in the top k layers only (``model.lora.layers=k``) or a frozen base
(``adapter=frozen``), the embeddings and every layer below the first one that trains compute
the same hidden states for the same text in every epoch, round and scoring. :class:`FrozenPrefix`
computes them once per distinct text (keyed by its token ids) and per process (models whose
frozen layers are the same to the bit share them, so the institutions a host carries and the
later runs of a compare reuse them), keeps them on the model's device, and replays them into the
model: its embeddings' output is replaced by the stored states and only the layers from the
boundary up run. The model's own forward still builds the attention mask, pools and classifies,
so the logits are those of the full model (a test checks 1e-5).

The stored states are computed in eval mode: frozen layers run without dropout, where the
uncached path applies the model's dropout to them during training. Scoring (eval mode) is the
same either way; training differs only by that dropout, which is why caching changes the
numbers of a run that trains the model in train mode with dropout above zero.

Architectures the prefix knows: an ``embeddings`` module followed by an ``encoder.layer`` list
(BERT and its relatives: MiniLM, RoBERTa, ELECTRA, ...). Others run the plain path.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["FrozenPrefix", "trim"]


def trim(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``ids`` cut to the batch's longest text (dynamic padding): trailing columns of padding only are dropped.

    Padding is masked out of attention, so the logits do not change; short texts stop paying for long ones."""
    if ids.ndim != 2 or ids.shape[1] == 0:
        return ids
    used = (ids != pad_id).any(dim=0)
    if bool(used[-1]):
        return ids
    last = int(torch.nonzero(used).max()) + 1 if bool(used.any()) else 1
    return ids[:, :last]


def _find(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(the embeddings module, the encoder whose ``layer`` list follows it), or None for another architecture."""
    for _, module in model.named_modules():
        encoder, embeddings = getattr(module, "encoder", None), getattr(module, "embeddings", None)
        if isinstance(embeddings, nn.Module) and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
            return embeddings, encoder
    return None


LIMIT_BYTES = 1 << 30
"""Most bytes of stored states a process keeps (oldest dropped first): about 43,000 texts of 16 tokens on MiniLM."""
_STORES: dict[str, dict[bytes, torch.Tensor]] = {}
_HELD = [0]
"""Bytes of stored states in this process (kept as it changes, so storing a batch never walks every store)."""


def _fingerprint(embeddings: nn.Module, layers: list[nn.Module]) -> str:
    """A digest of the frozen bottom's weights: models built anew for every run share stored states only when their
    frozen layers are the same to the bit (the same pretrained weights; a randomly initialised model never)."""
    h = hashlib.blake2b(digest_size=16)
    for module in (embeddings, *layers):
        for name, value in module.state_dict().items():
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(str(len(layers)).encode())
    return h.hexdigest()


def _shared(fingerprint: str) -> dict[bytes, torch.Tensor]:
    """The process's store for this frozen bottom: runs after the first (other seeds' schemes, other rounds) reuse it."""
    return _STORES.setdefault(fingerprint, {})


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _evict() -> None:
    """Drop the oldest stored states until the process holds at most :data:`LIMIT_BYTES`."""
    for store in _STORES.values():
        while _HELD[0] > LIMIT_BYTES and store:
            _HELD[0] -= _nbytes(store.pop(next(iter(store))))


class FrozenPrefix:
    """The stored outputs of a model's frozen bottom: ``hidden(ids)``, then ``with replay(hidden): model(ids)``."""

    def __init__(self, embeddings: nn.Module, encoder: nn.Module, boundary: int, pad_id: int) -> None:
        self.embeddings, self.encoder, self.boundary, self.pad_id = embeddings, encoder, boundary, int(pad_id)
        self.fingerprint = _fingerprint(embeddings, list(encoder.layer)[:boundary])

    @property
    def store(self) -> dict[bytes, torch.Tensor]:
        """The process's stored states for this frozen bottom on the device the model is on now (a host may move its
        model to a GPU after building it; a coordinator in the same process keeps its own on the CPU)."""
        device = next(self.embeddings.parameters()).device
        return _shared(f"{self.fingerprint}@{device}")

    @classmethod
    def of(cls, model: nn.Module, pad_id: int) -> FrozenPrefix | None:
        """The prefix of ``model`` below its first layer that trains; None when nothing below it is frozen."""
        found = _find(model)
        if found is None:
            return None
        embeddings, encoder = found
        if any(p.requires_grad for p in embeddings.parameters()):
            return None
        trains = [i for i, layer in enumerate(encoder.layer) if any(p.requires_grad for p in layer.parameters())]
        boundary = trains[0] if trains else len(encoder.layer)
        return cls(embeddings, encoder, boundary, pad_id) if boundary > 0 else None

    def hidden(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The states entering layer ``boundary`` for each row of ``ids`` ``(B, L, H)``: stored, or computed now."""
        lengths = mask.sum(dim=1).tolist()
        keys = [ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        store = self.store
        rows = [i for k, i in first.items() if k not in store]
        if rows:
            states = self._compute(model, ids[rows], mask[rows])
            for j, i in enumerate(rows):
                store[keys[i]] = states[j, : lengths[i]].clone()  # its own memory, not a view of the batch
                _HELD[0] += _nbytes(store[keys[i]])
        like = store[keys[0]]
        out = like.new_zeros((len(keys), ids.shape[1], like.shape[-1]))
        for i, k in enumerate(keys):
            out[i, : lengths[i]] = store[k]
        if rows:
            _evict()  # after the batch is assembled: its own states are never dropped before use
        return out

    def _compute(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings and the frozen layers, in eval mode without gradients, through the model's own forward."""
        seen: list[torch.Tensor] = []
        layers = self.encoder.layer
        hook = self.encoder.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple)
                                                                                  else out.last_hidden_state))
        was_training = model.training
        try:
            self.encoder.layer = nn.ModuleList(list(layers)[: self.boundary])
            model.eval()
            # Plain tensors even when scoring under inference mode: training later saves them for backward.
            with torch.inference_mode(False), torch.no_grad():
                model(input_ids=ids.clone(), attention_mask=mask.clone())
        finally:
            self.encoder.layer = layers
            hook.remove()
            model.train(was_training)
        return seen[0]

    @contextlib.contextmanager
    def replay(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within: the embeddings return ``hidden`` and the encoder runs only the layers from ``boundary`` up."""
        layers = self.encoder.layer
        hook = self.embeddings.register_forward_hook(lambda _m, _a, _out: hidden)
        try:
            self.encoder.layer = nn.ModuleList(list(layers)[self.boundary:])
            yield
        finally:
            self.encoder.layer = layers
            hook.remove()
