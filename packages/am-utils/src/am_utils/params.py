"""Parameter counts and summaries; safe on meta-device, DTensor and 4-bit quantized models."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from am_dtype.dtensor import to_local

logger = logging.getLogger(__name__)

__all__ = ["count_model_parameters", "print_trainable_parameters"]


def _get_logical_numel(param) -> int:
    """Number of logical elements of ``param``, undoing packed quantized storage.

    bitsandbytes ``Params4bit`` packs two 4-bit values per byte; the original shape is kept
    in ``param.quant_state.shape``. Any parameter carrying such a ``quant_state`` is counted
    by that shape (duck-typed so bitsandbytes need not be installed); others by ``numel()``.
    """
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        return math.prod(shape)
    return param.numel()


@torch.no_grad()
def _get_model_param_stats(model: nn.Module) -> tuple[int, int, float]:
    """Return ``(total_params, trainable_params, local_sq_norm)``.

    ``local_sq_norm`` is the sum of squared L2 norms of the locally held values (the local
    shard of DTensor parameters); meta tensors, which hold no values, contribute nothing.
    """
    total, trainable = count_model_parameters(model)[::-1]
    sq_norm = 0.0
    for param in model.parameters():
        local = to_local(param.detach())
        if local.is_meta or local.numel() == 0 or not local.is_floating_point():
            continue
        sq_norm += float(local.float().pow(2).sum())
    return total, trainable, sq_norm


def count_model_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable_params, total_params)``; safe on meta-device models.

    Shared (tied) parameters count once; DTensor parameters count their global size;
    quantized parameters count their logical size (see ``_get_logical_numel``).
    """
    total = trainable = 0
    for param in model.parameters():
        n = _get_logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


@torch.no_grad()
def print_trainable_parameters(model: nn.Module, name: str = "Model") -> tuple[int, int]:
    """Log a summary (trainable, total, percentage, parameter L2 norm) under ``name``.

    The norm is over the values held by this process (the local shards when sharded).
    Returns ``(trainable_params, total_params)``.
    """
    total, trainable, sq_norm = _get_model_param_stats(model)
    pct = 100.0 * trainable / total if total else 0.0
    logger.info("%s summary:", name)
    logger.info("  trainable parameters: %s", f"{trainable:,}")
    logger.info("  total parameters: %s", f"{total:,}")
    logger.info("  trainable percentage: %.2f%%", pct)
    logger.info("  parameter L2 norm (local): %.4f", math.sqrt(sq_norm))
    return trainable, total
