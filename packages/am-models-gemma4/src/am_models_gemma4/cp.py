"""Context parallelism for Gemma 4, owned by the model.

A CP group of N ranks splits every sequence into 2N chunks and gives rank r chunks r and
2N-1-r (load balancing: with causal attention the early chunks are cheap and the late
ones expensive, so each rank gets one of each). Embeddings (text + merged image features,
and the per-layer inputs of E2B/E4B) are computed on the full sequence *before* sharding,
so image features never straddle ranks; labels are shifted before sharding, so the last
token of a chunk still has its target.

Attention: every text attention layer is switched to the `"am_gemma4_cp"` attention
implementation, which gathers the keys/values of all CP ranks (a differentiable all-gather:
its backward all-reduces the key/value gradients and keeps this rank's slice) and masks by
*global* positions (the sharded `position_ids`): causal, and for sliding layers within the
window. K/V-shared layers read their source layer's local K/V from the per-forward store and
gather them the same way, so sharing holds under CP. Limits: one document per row, no
padding (packed or padded rows need the same global-position masks per document, not done).
The exchange is an all-gather, not a p2p ring: the same bytes per rank, not overlapped.

Shape legend: B batch, S local sequence, T global sequence, H heads, D head dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CP_ATTENTION", "cp_attention", "load_balanced_indices", "setup_cp_attention"]

CP_ATTENTION = "am_gemma4_cp"


def load_balanced_indices(seq_len: int, cp_size: int, cp_rank: int) -> Tensor:
    """Token positions rank `cp_rank` keeps: chunks r and 2N-1-r of 2N equal chunks."""
    chunks = 2 * cp_size
    if seq_len % chunks:
        raise ValueError(
            f"context parallelism over {cp_size} ranks needs the sequence length ({seq_len}) "
            f"to be a multiple of {chunks}; pad the batch"
        )
    size = seq_len // chunks
    first = torch.arange(cp_rank * size, (cp_rank + 1) * size)
    last_chunk = chunks - 1 - cp_rank
    return torch.cat([first, torch.arange(last_chunk * size, (last_chunk + 1) * size)])


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim -2 in rank order; backward sums the gradient over ranks and
    returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.size = x.shape[-2]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.size
        return grad[..., start : start + ctx.size, :], None


def _gather_positions(position_ids: Tensor, group: Any) -> Tensor:
    parts = [torch.empty_like(position_ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, position_ids.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def cp_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    position_ids: Tensor | None = None,
    **_: Any,
) -> tuple[Tensor, None]:
    """transformers attention-interface function: q [B, H, S, D] local, k/v [B, Hkv, S, D]
    local -> [B, S, H, D], attending over every CP rank's keys by global position."""
    group = getattr(module, "_am_cp_group", None)
    if group is None or position_ids is None:
        raise RuntimeError(
            "the CP attention needs setup_cp_attention(cp_mesh) and position_ids (global "
            "positions of this rank's tokens, as _cp_shard_batch produces)"
        )
    k_all = _GatherSeq.apply(key, group)
    v_all = _GatherSeq.apply(value, group)
    q_pos = position_ids.reshape(-1, position_ids.shape[-1])[0]
    k_pos = _gather_positions(q_pos, group)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    out = F.scaled_dot_product_attention(
        query,
        k_all,
        v_all,
        attn_mask=allowed[None, None],
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != k_all.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if CP_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(CP_ATTENTION, cp_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(CP_ATTENTION, sdpa_mask)


def setup_cp_attention(model: Any, cp_mesh: Any) -> None:
    """Switch the text attention layers of `model` to CP attention over `cp_mesh`
    (idempotent; a 1-rank mesh keeps the current implementation)."""
    if cp_mesh is None or cp_mesh.size() <= 1:
        return
    if getattr(model, "_cp_enabled", False):
        return
    _register()
    group = cp_mesh.get_group()
    text = model.config.get_text_config()
    text._attn_implementation = CP_ATTENTION
    for layer in model.model.language_model.layers:
        getattr(layer, "_checkpoint_wrapped_module", layer).self_attn._am_cp_group = group
    model._cp_mesh = cp_mesh
    model._cp_enabled = True
