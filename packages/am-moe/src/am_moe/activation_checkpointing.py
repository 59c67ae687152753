"""Activation checkpointing of transformer blocks: the one wrapper the parallelizer and models use.

Each block of a ModuleList / ModuleDict is replaced by a non-reentrant
`checkpoint_wrapper` (its activations are recomputed in backward). Non-reentrant
checkpointing composes with FSDP2 and keeps the wrapped block's parameter names
reachable through `_checkpoint_wrapped_module`, which `unwrap_checkpointed` removes again.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

__all__ = ["checkpoint_blocks", "is_checkpointed", "uncheckpoint_blocks", "unwrap_checkpointed"]


def _keys(container: nn.Module) -> list:
    if isinstance(container, nn.ModuleDict):
        return list(container.keys())
    if isinstance(container, nn.ModuleList):
        return list(range(len(container)))
    raise TypeError(
        f"expected an nn.ModuleList or nn.ModuleDict of blocks, got {type(container).__name__}"
    )


def is_checkpointed(module: nn.Module) -> bool:
    """True if `module` is an activation-checkpoint wrapper."""
    return isinstance(module, CheckpointWrapper)


def unwrap_checkpointed(module: nn.Module) -> nn.Module:
    """The block inside a checkpoint wrapper; any other module as it is."""
    return module._checkpoint_wrapped_module if is_checkpointed(module) else module


def checkpoint_blocks(container: nn.Module) -> int:
    """Wrap every block of `container` in a non-reentrant checkpoint wrapper, in place.

    Idempotent: a block already wrapped is left as it is. Returns how many were wrapped now.
    """
    wrapped = 0
    for key in _keys(container):
        if not is_checkpointed(container[key]):
            container[key] = checkpoint_wrapper(
                container[key], checkpoint_impl=CheckpointImpl.NO_REENTRANT
            )
            wrapped += 1
    return wrapped


def uncheckpoint_blocks(container: nn.Module) -> int:
    """Undo `checkpoint_blocks`: put each wrapped block back in place. Returns how many."""
    unwrapped = 0
    for key in _keys(container):
        if is_checkpointed(container[key]):
            container[key] = unwrap_checkpointed(container[key])
            unwrapped += 1
    return unwrapped
