"""Attention-mask helpers of the Gemma 4 model: padding masks from any mask form, bool <->
additive 4D masks, and the packed (several documents per row) full / sliding mask mapping."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["_convert_bool_4d_mask_to_additive", "_derive_padding_mask"]


def _allowed_from_4d(mask: Tensor) -> Tensor:
    """[B, H, Q, K] bool (True = may attend) from a bool or additive (0 = attend) 4D mask."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"a 4D attention_mask must be bool or floating point, got {mask.dtype}")
    return mask == 0


def _derive_padding_mask(attention_mask: Tensor) -> Tensor:
    """[B, S] bool, True = padding, from a 1D / 2D (1 = real token) or 4D attention mask.

    A 4D mask (bool True = may attend, or additive 0 = attend) marks key position k as
    padding when no query of the row may attend to it.
    """
    if attention_mask.dim() == 1:
        return ~attention_mask.bool().unsqueeze(0)
    if attention_mask.dim() == 2:
        return ~attention_mask.bool()
    if attention_mask.dim() == 4:
        allowed = _allowed_from_4d(attention_mask)
        return ~allowed.any(dim=-2).any(dim=1)
    raise ValueError(
        f"attention_mask must be 1D, 2D or 4D, got shape {tuple(attention_mask.shape)}"
    )


def _convert_bool_4d_mask_to_additive(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """4D bool allowed-mask -> transformers' additive form (0.0 allowed, -inf masked).

    A mask that is already floating point is returned in `dtype` unchanged in value.
    """
    if attention_mask.dim() != 4:
        raise ValueError(
            f"_convert_bool_4d_mask_to_additive needs a 4D mask, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    if attention_mask.is_floating_point():
        return attention_mask.to(dtype)
    if attention_mask.dtype != torch.bool:
        raise ValueError(
            f"a 4D attention_mask must be bool or floating point, got {attention_mask.dtype}"
        )
    out = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return out.masked_fill(~attention_mask, float("-inf"))
