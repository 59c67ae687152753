"""`MoEFSDPSyncMixin`: defer FSDP2 gradient reduction to the last microbatch of a window.

With gradient accumulation over M microbatches, FSDP2 by default reduce-scatters gradients
and reshards parameters after every backward. Only the last reduction is needed: gradients
can accumulate unsharded locally and be reduced once. The mixin switches every FSDP2 module
inside the model to "accumulate, keep unsharded" for the first M-1 backwards and back to
"reduce and reshard" for the last one. The result is the same gradient with 1/M of the
reduce-scatter traffic and no all-gather between microbatches' backward and next forward.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp import FSDPModule

__all__ = ["MoEFSDPSyncMixin", "iter_fsdp_modules"]


def iter_fsdp_modules(module: nn.Module) -> Iterator[FSDPModule]:
    """Every FSDP2-managed module under `module`, itself included (root, blocks, experts)."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            yield sub


def _set_sync(module: nn.Module, final: bool) -> None:
    for fsdp_module in iter_fsdp_modules(module):
        # recurse=False: each FSDP module is visited here, so each sets only its own state.
        fsdp_module.set_is_last_backward(final)
        fsdp_module.set_reshard_after_backward(final, recurse=False)
        fsdp_module.set_requires_gradient_sync(final, recurse=False)


class MoEFSDPSyncMixin:
    """Mixin for an `nn.Module` model trained with FSDP2 and gradient accumulation.

    Call `prepare_for_grad_accumulation()` before the first microbatch of a window and
    `prepare_for_final_backward()` before the last microbatch's backward. With pipeline
    parallelism (`pp_enabled=True`) both are no-ops: the pipeline schedule decides which
    backward is last and drives FSDP itself. A model carrying a `backend` (BackendConfig) with
    `enable_fsdp_optimizations=False` keeps FSDP's default (sync every microbatch), which is
    correct but does more communication.
    """

    def _fsdp_sync_enabled(self, pp_enabled: bool) -> bool:
        backend = getattr(self, "backend", None)
        return not pp_enabled and getattr(backend, "enable_fsdp_optimizations", True)

    def prepare_for_grad_accumulation(self, pp_enabled: bool = False) -> None:
        """Before a window: later backwards accumulate unsharded grads without reduction."""
        if self._fsdp_sync_enabled(pp_enabled):
            _set_sync(self, final=False)

    def prepare_for_final_backward(self, pp_enabled: bool = False) -> None:
        """Before the window's last backward: reduce-scatter the accumulated grads, reshard."""
        if self._fsdp_sync_enabled(pp_enabled):
            _set_sync(self, final=True)
