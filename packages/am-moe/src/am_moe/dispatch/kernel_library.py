"""Shared base of the GPU kernel-library dispatchers (DeepEP, HybridEP, UCCL-EP).

The library is imported when a dispatcher is constructed, never at module import; its
communication buffers are cached per (buffer class, EP group) and shared across MoE blocks.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from am_moe.dispatch.base import TokenDispatcher
from am_moe.dispatch.grouping import _GroupCtx

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from am_dtype.backend import BackendConfig


# One communication buffer per (buffer class, EP group, key) shared by every dispatcher that
# asks to share: the libraries allocate hundreds of MiB of registered memory per buffer, and a
# model builds one dispatcher per MoE block.
_SHARED_BUFFERS: dict[tuple, Any] = {}


class _LibraryCall:
    """The buffer and handle of one dispatch, shared by its dispatch and combine nodes."""

    __slots__ = ("buffer", "handle")

    def __init__(self, buffer: Any) -> None:
        self.buffer, self.handle = buffer, None


@dataclass
class _KernelCtx:
    group_ctx: _GroupCtx
    call: _LibraryCall
    num_tokens: int


class _KernelLibraryDispatcher(TokenDispatcher):
    """Base of the GPU kernel-library dispatchers: imports the library and checks its API.

    The library is imported here, never at module import, so `import am_moe` stays light.
    Activations travel in `comm_dtype` (bf16 by default: the libraries' normal-mode combine
    kernels take bf16 only) and are cast back on arrival; None sends them as they are. Routing
    weights always travel as float32, the only dtype the kernels accept. `comm_dtype` is a
    constructor keyword and a plain attribute (tests set None for exact float64 rows).
    BackendConfig knobs: `dispatcher_num_sms` (SMs per communication kernel) and
    `dispatcher_share_token_dispatcher` (one buffer per EP group for all MoE blocks).
    """

    package: str = ""
    install_hint: str = ""  # how to get the library (it has no wheel to pip install)
    backend_name: str = ""
    module: str = ""
    buffer_class: str = ""
    buffer_methods: tuple[str, ...] = ()

    def __init__(
        self,
        num_experts: int,
        ep_group: ProcessGroup,
        *,
        backend: BackendConfig | None = None,
        comm_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        if importlib.util.find_spec(self.package) is None:
            raise ImportError(
                f"dispatcher={self.backend_name!r} needs the '{self.package}' package, which is "
                f"not installed; {self.install_hint}, or use dispatcher='torch'"
            )
        self.library = importlib.import_module(self.module)
        buffer_cls = getattr(self.library, self.buffer_class, None)
        missing = [m for m in self.buffer_methods if not hasattr(buffer_cls, m)]
        if buffer_cls is None or missing:
            raise ImportError(
                f"dispatcher={self.backend_name!r} drives {self.module}.{self.buffer_class} "
                f"(methods {list(self.buffer_methods)}); the installed '{self.package}' lacks "
                f"{'it' if buffer_cls is None else missing}; install a build that has it or use "
                "dispatcher='torch'"
            )
        ep_size = dist.get_world_size(ep_group)
        if num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.ep_group, self.ep_size = ep_group, ep_size
        self.ep_rank = dist.get_rank(ep_group)
        self.comm_dtype = comm_dtype
        self.num_sms = backend.dispatcher_num_sms if backend is not None else 20
        self.share_buffer = backend is None or backend.dispatcher_share_token_dispatcher
        self.buffer_cls = buffer_cls
        self._own_buffers: dict[tuple, Any] = {}

    def _to_wire(self, x: Tensor) -> Tensor:
        if self.comm_dtype is not None:
            x = x.to(self.comm_dtype)
        return x.contiguous()

    def _cached_buffer(self, key: tuple) -> Any:
        cache = _SHARED_BUFFERS if self.share_buffer else self._own_buffers
        return cache.get((id(self.buffer_cls), id(self.ep_group), *key))

    def _store_buffer(self, key: tuple, buffer: Any) -> Any:
        cache = _SHARED_BUFFERS if self.share_buffer else self._own_buffers
        cache[(id(self.buffer_cls), id(self.ep_group), *key)] = buffer
        return buffer
