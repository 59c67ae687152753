"""Attention over a dense bool mask, skipping the key blocks no query of a chunk may see.

With a dense mask PyTorch's CPU flash-attention kernel scores every (query, key) pair
and masks afterwards: on a sliding-window layer (window W < sequence S) that is S^2 pairs
where at most S * W are allowed, and on a causal layer with a padding mask about twice
the causal half. `chunked_masked_attention` splits the queries into chunks of `CHUNK`
rows and gives each chunk only the contiguous key range its rows may attend to (the
range is read from the mask itself, so any pattern is handled: windows, padding, image
blocks, packed documents). Keys outside a chunk's range are masked for every row of the
chunk, so each row's softmax runs over exactly the same keys as before: the result
equals the unchunked call up to fp32 summation order.

It is used on CPU only (reading the ranges back is a host sync, and GPU batches use the
"flex" / "te" kernels for windows) and only where it removes at least a fifth of the
pairs; otherwise the caller runs the kernel once on the whole mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CHUNK", "chunked_masked_attention", "key_ranges"]

CHUNK = 128  # query rows per chunk: small enough to follow a window, large for the kernel
_MIN_SAVING = 0.2  # chunk only when it removes at least this share of the scored pairs

# The ranges of the last few masks (the same mask object serves every layer of a type in
# one forward); the masks are held so an entry's identity check cannot be fooled.
_CACHE: dict[int, tuple[Tensor, int, list[tuple[int, int, int, int]] | None]] = {}
_CACHE_SIZE = 4


def key_ranges(mask: Tensor, chunk: int = CHUNK) -> list[tuple[int, int, int, int]] | None:
    """[(q0, q1, k0, k1)] per query chunk of a bool mask [B or 1, 1 or H, Q, K] (True =
    may attend): keys k0:k1 hold every key any row q0:q1 of any batch row may attend to.

    None when chunking would not pay (under `_MIN_SAVING` of the pairs removed) or when a
    chunk attends to nothing (fully masked rows keep the kernel's own whole-mask result).
    """
    hit = _CACHE.get(id(mask))
    if hit is not None and hit[0] is mask and hit[1] == chunk:
        return hit[2]
    q_len, k_len = mask.shape[-2:]
    seen = mask.reshape(-1, q_len, k_len).any(0)  # [Q, K]
    ranges: list[tuple[int, int, int, int]] | None = []
    pairs = 0
    for q0 in range(0, q_len, chunk):
        q1 = min(q_len, q0 + chunk)
        cols = seen[q0:q1].any(0).nonzero()
        if cols.numel() == 0:
            ranges = None
            break
        k0, k1 = int(cols[0]), int(cols[-1]) + 1
        ranges.append((q0, q1, k0, k1))
        pairs += (q1 - q0) * (k1 - k0)
    if ranges is not None and pairs > (1 - _MIN_SAVING) * q_len * k_len:
        ranges = None
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[id(mask)] = (mask, chunk, ranges)
    return ranges


def chunked_masked_attention(
    kernel: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, mask: Tensor
) -> Tensor | None:
    """`kernel(q, k, v, mask=...)` over query chunks and their key ranges (q/k/v [B, H, S,
    D], mask bool [B or 1, 1, Q, K]); None when the whole-mask call should run instead."""
    if q.device.type != "cpu" or mask.dtype != torch.bool or mask.dim() != 4:
        return None
    if q.shape[2] < 2 * CHUNK or mask.shape[-2:] != (q.shape[2], k.shape[2]):
        return None
    ranges = key_ranges(mask, CHUNK)
    if ranges is None:
        return None
    outs = []
    for (q0, q1, k0, k1), q_c in zip(ranges, q.split(CHUNK, dim=2), strict=True):
        sub = mask[..., q0:q1, k0:k1]
        outs.append(kernel(q_c, k[:, :, k0:k1], v[:, :, k0:k1], mask=sub))
    return torch.cat(outs, dim=2)
