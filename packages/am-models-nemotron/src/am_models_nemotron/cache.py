"""`NemotronHybridCache`: decoding state for a hybrid Mamba2 / attention model.

Attention layers keep their keys and values in preallocated buffers that
grow by doubling, so appending a token costs O(1) amortized (no per-step
concatenation of the whole history). Mamba2 layers keep a fixed-size
`MambaState` (conv window + SSM state) that the mixer updates in place, so
their per-token cost does not depend on the context length at all.

The cache is for inference: buffers are written in place and are not meant
to be differentiated through.
"""

from __future__ import annotations

from typing import Any

import torch


class _KVBuffer:
    """Keys/values of one attention layer: [B, Hkv, capacity, Dh] with `length` filled."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_len = self.length + k.shape[2]
        if self.k is None or new_len > self.k.shape[2]:
            self._grow(k, v, max(new_len, 2 * (self.k.shape[2] if self.k is not None else 0)))
        self.k[:, :, self.length : new_len] = k
        self.v[:, :, self.length : new_len] = v
        self.length = new_len
        return self.k[:, :, :new_len], self.v[:, :, :new_len]

    def _grow(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        B, H, _, D = k.shape
        new_k = k.new_empty(B, H, capacity, D)
        new_v = v.new_empty(B, H, capacity, v.shape[-1])
        if self.k is not None:
            new_k[:, :, : self.length] = self.k[:, :, : self.length]
            new_v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = new_k, new_v

    def reorder(self, beam_idx: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, beam_idx.to(self.k.device))
            self.v = self.v.index_select(0, beam_idx.to(self.v.device))


class NemotronHybridCache:
    """Per-layer decoding state: KV buffers for attention layers, MambaState for Mamba layers.

    Build it with `NemotronHybridCache.for_model(model, batch_size)` (what
    `prepare_inputs_for_generation` does) or pass `mamba_states` directly
    ({layer_idx: MambaState}). `update(k, v, layer_idx)` is the attention
    layers' entry point; `mamba_state(layer_idx)` the Mamba layers'.
    """

    is_compileable = False

    def __init__(self, mamba_states: dict[int, Any], attention_layers: list[int]):
        self._mamba = dict(mamba_states)
        self._kv = {idx: _KVBuffer() for idx in attention_layers}
        self.has_previous_state = False
        self._seen_tokens = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int) -> NemotronHybridCache:
        """Empty cache for every Mamba and attention block of `model` (a NemotronV3Model)."""
        param = next(model.parameters())
        mamba, attention = {}, []
        for block in model.layers.values():
            if block.block_type == "mamba":
                mamba[block.layer_idx] = block.mixer.empty_state(
                    batch_size, device=param.device, dtype=param.dtype
                )
            elif block.block_type == "attention":
                attention.append(block.layer_idx)
        return cls(mamba, attention)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values [B, Hkv, S, Dh]; return all cached ones."""
        if layer_idx not in self._kv:
            raise KeyError(f"layer {layer_idx} is not an attention layer of this cache")
        return self._kv[layer_idx].append(key, value)

    def mamba_state(self, layer_idx: int) -> Any:
        """The in-place-updated MambaState of Mamba layer `layer_idx`."""
        if layer_idx not in self._mamba:
            raise KeyError(f"layer {layer_idx} is not a Mamba layer of this cache")
        return self._mamba[layer_idx]

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        """Number of tokens already processed (0 before prefill)."""
        if layer_idx is not None and layer_idx in self._kv:
            return self._kv[layer_idx].length
        return self._seen_tokens

    def advance(self, num_tokens: int) -> None:
        """Record that a forward consumed `num_tokens` new positions."""
        self._seen_tokens += num_tokens
        self.has_previous_state = True

    def kv_capacity(self, layer_idx: int) -> int:
        """Allocated key/value slots of attention layer `layer_idx` (for tests and sizing)."""
        buf = self._kv[layer_idx]
        return 0 if buf.k is None else buf.k.shape[2]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch dimension (beam search)."""
        for buf in self._kv.values():
            buf.reorder(beam_idx)
        for state in self._mamba.values():
            for name in ("conv_state", "ssm_state"):
                t = getattr(state, name)
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def __len__(self) -> int:
        return len(self._kv) + len(self._mamba)
