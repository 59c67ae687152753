"""Attention-mask helpers of the Gemma 4 model: padding masks from any mask form, bool <->
additive 4D masks, and the packed (several documents per row) full / sliding mask mapping."""

from __future__ import annotations

import torch
from torch import Tensor

from am_utils.masks import build_attention_mask, to_bool_mask

__all__ = [
    "_build_packed_gemma4_causal_mask_mapping",
    "_convert_bool_4d_mask_to_additive",
    "_derive_padding_mask",
]


def _allowed_from_4d(mask: Tensor) -> Tensor:
    """[B, H, Q, K] bool (True = may attend) from a bool or additive (0 = attend) 4D mask."""
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"a 4D attention_mask must be bool or floating point, got {mask.dtype}")
    return to_bool_mask(mask)


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


def _image_block_ids(mm_token_type_ids: Tensor | None, doc_ids: Tensor) -> Tensor:
    """[B, S] id of the image (or video) block each token is in, -1 for text.

    A block is a run of vision tokens (`mm_token_type_ids` 1 or 2) inside one document: a
    document boundary ends a block even between two vision tokens.
    """
    if mm_token_type_ids is None:
        return torch.full_like(doc_ids, -1)
    vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    continues = torch.zeros_like(vision)
    continues[:, 1:] = vision[:, :-1] & (doc_ids[:, 1:] == doc_ids[:, :-1])
    starts = vision & ~continues
    return torch.where(vision, starts.long().cumsum(dim=-1) - 1, -1)


def _build_packed_gemma4_causal_mask_mapping(
    packed_seq_ids: Tensor,
    mm_token_type_ids: Tensor | None,
    dtype: torch.dtype,
    sliding_window: int | None,
    as_additive: bool = False,
    as_block_mask: bool = False,
    flex_block_size: int | tuple[int, int] = 128,
) -> dict[str, Tensor]:
    """`{"full_attention": mask, "sliding_attention": mask}` for packed (VLM) rows.

    `packed_seq_ids` [B, S] holds 1-based document ids, 0 for padding. No token attends
    across documents. Full-attention layers are causal within a document; sliding layers
    allow a key when it is inside the window (`q - k < sliding_window`) AND (causal OR in
    the same image as the query): image tokens see their whole image bidirectionally, but
    never beyond the window into the past nor on full-attention layers (the rule of
    transformers 5.23's `create_masks_for_vision_model`, per document). Built on
    `am_utils.masks.build_attention_mask`; padding queries attend everywhere (finite rows,
    outputs unused) and no real query attends a padding key.

    Returns [B, 1, S, S] bool masks (True = may attend), additive ones in `dtype` (0 / -inf)
    with `as_additive`, or flex-attention `BlockMask`s with `as_block_mask`.
    """
    if packed_seq_ids.dim() != 2:
        raise ValueError(f"packed_seq_ids must be [B, S], got shape {tuple(packed_seq_ids.shape)}")
    if as_additive and as_block_mask:
        raise ValueError("choose at most one of as_additive and as_block_mask")
    ids = packed_seq_ids.long()
    real = ids > 0
    S = ids.shape[1]
    # causal within each document, padded keys blocked (am_utils.masks); rows with nothing
    # to attend (padding queries) attend everywhere, so they stay finite
    full = build_attention_mask(S, S, real, ids)
    sliding = build_attention_mask(S, S, real, ids, sliding_window=sliding_window)
    blocks = _image_block_ids(mm_token_type_ids, ids)
    same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    if sliding_window is not None:
        pos = torch.arange(S, device=ids.device)
        same_image &= (pos[None, :] > pos[:, None] - sliding_window)[None]
    masks = {"full_attention": full[:, 0], "sliding_attention": sliding[:, 0] | same_image}
    if as_block_mask:
        return {k: _to_block_mask(v, flex_block_size) for k, v in masks.items()}
    masks = {k: v.unsqueeze(1) for k, v in masks.items()}
    if as_additive:
        return {k: _convert_bool_4d_mask_to_additive(v, dtype) for k, v in masks.items()}
    return masks


def _to_block_mask(allowed_BQK: Tensor, block_size: int | tuple[int, int]):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed_BQK[b, q_idx, kv_idx]

    B, Q, K = allowed_BQK.shape
    return create_block_mask(
        mask_mod, B, None, Q, K, device=allowed_BQK.device.type, BLOCK_SIZE=block_size
    )
