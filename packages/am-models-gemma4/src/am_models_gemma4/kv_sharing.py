"""K/V sharing (Gemma 4 E2B/E4B): the trailing `num_kv_shared_layers` layers attend with the
keys/values of the last earlier layer of the same type, read from a per-forward store.

transformers 5.23 already does the right thing in the two places older versions did not
(the tests in `test_kv_sharing.py` show both):

- its shared layers read `shared_kv_states` whether or not a cache exists, so
  `use_cache=False` (training, activation checkpointing, CP) needs no stand-in cache;
  `_Gemma4KVShareHolder` is that stand-in for callers that still pass one;
- its store `KVSharingDict` is a `UserDict`, not a `dict`, so FSDP2's forward-input cast
  (`cast_forward_inputs=True`, which rebuilds every `dict` it meets) passes it through as
  the same object. Our MoE backend uses `_FSDPSafeSharedKVStates`, a `MutableMapping`, for
  the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from torch import Tensor

__all__ = ["_FSDPSafeSharedKVStates", "_Gemma4KVShareHolder", "_kv_sharing_active"]


def _kv_sharing_active(text_config: Any) -> bool:
    """True if the (dense) text config shares K/V across its last layers (E2B/E4B)."""
    if getattr(text_config, "enable_moe_block", False):
        return False
    return int(getattr(text_config, "num_kv_shared_layers", 0) or 0) > 0


class _FSDPSafeSharedKVStates(MutableMapping):
    """The `{layer_type: (keys, values)}` store of one forward, safe to pass through FSDP2.

    FSDP2 with `MixedPrecisionPolicy(cast_forward_inputs=True)` casts each wrapped layer's
    float inputs with torch's `_apply_to_tensors`, which returns a *new* container for every
    `dict` (and list/tuple/dataclass) it visits. A plain dict would reach every layer as a
    private copy: the source layer's write would be lost and the shared layer's read would
    raise `KeyError: 'sliding_attention'`. This mapping is none of those types, so every
    layer sees (and writes) the same object.
    """

    def __init__(self) -> None:
        self._store: dict[str, tuple[Tensor, Tensor]] = {}

    def __getitem__(self, key: str) -> tuple[Tensor, Tensor]:
        try:
            return self._store[key]
        except KeyError:
            raise KeyError(
                f"no shared K/V stored for {key!r} yet (stored: {sorted(self._store)}): the "
                "source layer of a K/V-shared layer must run first in the same forward"
            ) from None

    def __setitem__(self, key: str, value: tuple[Tensor, Tensor]) -> None:
        self._store[key] = value

    def __delitem__(self, key: str) -> None:
        del self._store[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def to(self, device: Any, non_blocking: bool = False) -> _FSDPSafeSharedKVStates:
        """Move the stored tensors in place (accelerate's `send_to_device` calls this)."""
        for key, value in self._store.items():
            self._store[key] = tuple(t.to(device, non_blocking=non_blocking) for t in value)
        return self


class _Gemma4KVShareHolder:
    """A cache-free stand-in for `past_key_values` in a training forward (no decoding).

    Older transformers gated the K/V-sharing read on `past_key_values is not None`, which
    `use_cache=False` (forced by activation checkpointing and CP) makes false, so shared
    layers silently used their own dead projections. Passing this object satisfies such a
    gate without holding memory: `update` returns the new keys/values unchanged, lengths and
    offsets are zero (a forward from position 0), and `shared_layers` is the store.
    transformers 5.23 does not need it (see the module docstring); it still works as a
    `past_key_values` there, which the tests check.
    """

    is_compileable = False
    is_sliding: list[bool] = []

    def __init__(self) -> None:
        self.shared_layers: dict = {}

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *_, **__):
        return key_states, value_states

    def get_seq_length(self, *_: Any, **__: Any) -> int:
        return 0

    def get_query_offset(self, *_: Any, **__: Any) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = None) -> tuple[int, int]:
        return query_length, 0
