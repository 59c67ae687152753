"""Recycled storage for the fused CPU path's tensors that outlive the call (`_TensorPool`).

`rows._Workspace` holds scratch buffers that die within one call. The fused path also makes
tensors that outlive it: the pre-activation saved for backward, the weight gradients handed
to autograd, the per-token outputs. Fresh, a CPU tensor of tens of MB comes from mmap and
is zero-filled by the kernel one 4 KiB page at a time on first touch: at the benchmark
shape (bench/moe.py, geglu) 74k page faults and ~0.25 s of kernel time per fwd+bwd of a
~3.3 s step, 28k faults in the forward alone (transformers' eager loop makes its per-expert
tensors a few MB each, which malloc recycles without faulting).

The pool keeps the storage of each tensor it hands out and hands it out again once nothing
else refers to it: its storage's use count is back to the pool's own reference, i.e. every
tensor viewing it (the saved tensor, a `.grad` autograd adopted, the caller's output, any
view) is gone. A saved tensor stays alive while its graph can still run backward
(`retain_graph=True`), a gradient while it is a parameter's `.grad`, so neither is ever
reused early; a storage in use is skipped and a new one is made. Like a caching allocator it
keeps the memory of the largest working set until `clear()`.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__: list[str] = []  # private building blocks of the expert kernels

# Storages kept per (bytes, dtype, device), at most: beyond this (many layers' tensors alive
# at once) new tensors are plain allocations.
_MAX_PER_KEY = 64
# Smaller tensors are plain allocations: malloc recycles them without page faults.
_MIN_BYTES = 1 << 20


def _free(storage: torch.UntypedStorage) -> bool:
    # 1: only the pool's own reference; every tensor made over it has been freed.
    return torch._C._storage_Use_Count(storage._cdata) == 1


class _TensorPool:
    """Per-thread lists of storages, handed out as fresh contiguous tensors once unused."""

    def __init__(self) -> None:
        self._local = threading.local()

    def empty(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor of `shape` with like's dtype and device."""
        shape = tuple(shape)
        nbytes = like.element_size()
        for n in shape:
            nbytes *= n
        if nbytes < _MIN_BYTES:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        key = (nbytes, like.dtype, like.device)
        storages = self._local.__dict__.setdefault("storages", {}).setdefault(key, [])
        storage = next((s for s in storages if _free(s)), None)
        if storage is None:
            fresh = torch.empty(shape, dtype=like.dtype, device=like.device)
            if len(storages) < _MAX_PER_KEY:
                storages.append(fresh.untyped_storage())
            return fresh
        return torch.empty(0, dtype=like.dtype, device=like.device).set_(storage, 0, shape)

    def clear(self) -> None:
        """Drop this thread's storages (tensors still using one keep it alive)."""
        self._local.__dict__.pop("storages", None)


_POOL = _TensorPool()
