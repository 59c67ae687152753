"""Squeezing of THD (packed sequence) batches that carry a placeholder batch dim of 1."""

from __future__ import annotations

import torch

__all__ = ["squeeze_input_for_thd"]

_CU_SEQLENS_KEYS = ("cu_seqlens", "cu_seqlens_padded")


def _squeeze_batch_dim(
    name: str, tensor: torch.Tensor | None, strict: bool = True
) -> torch.Tensor | None:
    """Drop a leading batch dim of 1; 1D tensors are taken as already squeezed.

    ``strict`` rejects a leading dim other than 1 (it means the batch was not THD-collated);
    otherwise such a tensor is returned unchanged.
    """
    if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
        return tensor
    if tensor.shape[0] != 1:
        if not strict:
            return tensor
        raise ValueError(
            f"THD inputs carry a placeholder batch dim of 1; {name} has shape {tuple(tensor.shape)}"
        )
    return tensor.squeeze(0)


def _max_seqlen_to_int(value: torch.Tensor) -> int:
    if value.numel() != 1:
        raise ValueError(
            f"max_seqlen must hold a single value, got a tensor of shape {tuple(value.shape)}"
        )
    return int(value.item())


def squeeze_input_for_thd(
    input_ids, position_ids, padding_mask, attn_kwargs, seqlens_padding_value=-1000
):
    """Remove the placeholder batch dim of a THD batch and clean its attention kwargs.

    - ``input_ids`` (``[1, T]`` or ``[1, T, H]``; ``None`` when the model is fed
      ``inputs_embeds``), ``position_ids`` and ``padding_mask`` lose dim 0.
    - every tensor in ``attn_kwargs`` loses a leading dim of 1; ``cu_seqlens`` and ``cu_seqlens_padded``
      drop the entries equal to ``seqlens_padding_value`` (collation pads them to a fixed
      length with that sentinel); a tensor ``max_seqlen`` becomes a Python int.

    ``attn_kwargs`` is updated in place (and returned) so callers holding the dict see the
    squeezed values. Returns ``(input_ids, position_ids, padding_mask, attn_kwargs)``.
    """
    input_ids = _squeeze_batch_dim("input_ids", input_ids)
    position_ids = _squeeze_batch_dim("position_ids", position_ids)
    padding_mask = _squeeze_batch_dim("padding_mask", padding_mask)
    for key, value in list(attn_kwargs.items()):
        if not isinstance(value, torch.Tensor):
            continue
        known = key in _CU_SEQLENS_KEYS or key == "max_seqlen"
        value = _squeeze_batch_dim(key, value, strict=known)
        if key in _CU_SEQLENS_KEYS:
            value = value[value != seqlens_padding_value].contiguous()
        elif key == "max_seqlen":
            value = _max_seqlen_to_int(value)
        attn_kwargs[key] = value
    return input_ids, position_ids, padding_mask, attn_kwargs
