"""Context parallelism for Gemma 4, owned by the model.

A CP group of N ranks splits every sequence into 2N chunks and gives rank r chunks r and
2N-1-r (load balancing: with causal attention the early chunks are cheap and the late
ones expensive, so each rank gets one of each). Embeddings (text + merged image features,
and the per-layer inputs of E2B/E4B) are computed on the full sequence *before* sharding,
so image features never straddle ranks; labels are shifted before sharding, so the last
token of a chunk still has its target.

Attention: every text attention layer is switched to the `"am_gemma4_cp"` attention
implementation, a p2p ring attention (`_RingAttention`): each rank's K/V block travels once
around the CP ranks while every rank merges its partial softmax by log-sum-exp; the backward
sends each block's dK/dV around with it until it is home. Masks use *global* positions (the
sharded `position_ids`): causal, and for sliding layers within the window. K/V-shared layers
read their source layer's local K/V from the per-forward store and ring them the same way,
so sharing holds under CP. Limits: one document per row, no padding (packed or padded rows
would need per-document ids in the ring), no attention dropout; the block math is plain
matmuls in fp32 (no fused kernel), and sends are not overlapped with compute.

`Gemma4CPMixin` holds the model-owned entry points (`prepare_model_inputs_for_cp`,
`_prepare_per_layer_inputs_for_cp`, `setup_cp_attention`, `_cp_shard_batch`).

Shape legend: B batch, S local sequence, H heads, D head dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from am_utils.loss import next_token_targets

__all__ = [
    "CP_ATTENTION",
    "Gemma4CPMixin",
    "cp_attention",
    "load_balanced_indices",
    "setup_cp_attention",
]


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


def _allowed(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """[S_q, S_k] True where a query may attend a key, by global position."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def _exchange(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """Send `tensors` to the next CP rank and receive the previous rank's (p2p ring step)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prev = dist.get_global_rank(group, (rank - 1) % size)
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, received, strict=True):
        ops.append(dist.P2POp(dist.isend, t.contiguous(), nxt, group))
        ops.append(dist.P2POp(dist.irecv, r, prev, group))
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _RingAttention(torch.autograd.Function):
    """Exact causal / sliding-window attention over the CP ranks' keys, passed around a p2p
    ring: at step i a rank holds the K/V block of rank (r - i) mod N, merges its partial
    softmax into the running output (log-sum-exp), and forwards the block. Backward walks
    the same ring, carrying each block's dK/dV with it until it is home again.

    q, k, v: [B, H, S, D] (k/v already expanded to H heads), positions: [S] global.
    """

    @staticmethod
    def forward(ctx, q, k, v, positions, window, scale, group):
        size = dist.get_world_size(group)
        qf = q.float()
        out = torch.zeros_like(qf)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        kb, vb, pb = k, v, positions
        for step in range(size):
            nxt = _exchange([kb, vb, pb], group) if step < size - 1 else None
            scores = torch.matmul(qf, kb.float().transpose(-1, -2)) * scale
            scores = scores.masked_fill(~_allowed(positions, pb, window), float("-inf"))
            block_lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - block_lse[..., None]).nan_to_num(0.0)
            block_out = torch.matmul(probs, vb.float())
            new_lse = torch.logaddexp(lse, block_lse)
            keep = torch.exp(lse - new_lse).nan_to_num(0.0)[..., None]
            add = torch.exp(block_lse - new_lse).nan_to_num(0.0)[..., None]
            out = out * keep + block_out * add
            lse = new_lse
            if nxt is not None:
                kb, vb, pb = nxt
        ctx.save_for_backward(q, k, v, positions, out, lse)
        ctx.window, ctx.scale, ctx.group = window, scale, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, positions, out, lse = ctx.saved_tensors
        size = dist.get_world_size(ctx.group)
        qf, do = q.float(), grad_out.float()
        delta = (do * out).sum(dim=-1, keepdim=True)
        dq = torch.zeros_like(qf)
        kb, vb, pb = k, v, positions
        dkb, dvb = (
            torch.zeros_like(k, dtype=torch.float32),
            torch.zeros_like(v, dtype=torch.float32),
        )
        for _ in range(size):
            kf = kb.float()
            scores = torch.matmul(qf, kf.transpose(-1, -2)) * ctx.scale
            scores = scores.masked_fill(~_allowed(positions, pb, ctx.window), float("-inf"))
            probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
            dvb = dvb + torch.matmul(probs.transpose(-1, -2), do)
            dscores = probs * (torch.matmul(do, vb.float().transpose(-1, -2)) - delta)
            dq = dq + torch.matmul(dscores, kf) * ctx.scale
            dkb = dkb + torch.matmul(dscores.transpose(-1, -2), qf) * ctx.scale
            kb, vb, pb, dkb, dvb = _exchange([kb, vb, pb, dkb, dvb], ctx.group)
        # After N steps every block (and its accumulated dK/dV) is back at its owner.
        return dq.to(q.dtype), dkb.to(k.dtype), dvb.to(v.dtype), None, None, None, None


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
    local -> [B, S, H, D], attending over every CP rank's keys (p2p ring) by global position."""
    group = getattr(module, "_am_cp_group", None)
    if group is None or position_ids is None:
        raise RuntimeError(
            "the CP attention needs setup_cp_attention(cp_mesh) and position_ids (global "
            "positions of this rank's tokens, as _cp_shard_batch produces)"
        )
    if dropout:
        raise ValueError(f"the CP attention has no dropout (got attention_dropout={dropout})")
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    positions = position_ids.reshape(-1, position_ids.shape[-1])[0].contiguous()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _RingAttention.apply(query, key, value, positions, sliding_window, scale, group)
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


class Gemma4CPMixin:
    """The model-owned CP entry points of `Gemma4ForConditionalGeneration` (see module doc)."""

    def _prepare_per_layer_inputs_for_cp(
        self, input_ids: torch.Tensor, special_image_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """Per-layer input embeddings (E2B/E4B) of the full sequence, image positions read
        as the pad token (as transformers does); None for models without them."""
        text_model = self.model.language_model
        if not getattr(self.config.get_text_config(), "hidden_size_per_layer_input", 0):
            return None
        ids = torch.where(special_image_mask, self._get_text_pad_token_id(), input_ids)
        return text_model.get_per_layer_inputs(ids, None)

    def prepare_model_inputs_for_cp(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Embeddings of the full sequence before CP sharding: `inputs_embeds`,
        `position_ids`, `per_layer_inputs` (when the model has them) and `_cp_make_batch_fn`
        (this model's `_cp_shard_batch`, which also installs the CP attention)."""
        image_mask = self._get_special_image_mask(input_ids, mm_token_type_ids)
        out: dict[str, Any] = {
            "inputs_embeds": self.prepare_inputs_embeds_for_cp(
                input_ids, pixel_values, image_position_ids, mm_token_type_ids
            ),
            "position_ids": torch.arange(input_ids.shape[1], device=input_ids.device)[None],
            "_cp_make_batch_fn": self._cp_shard_batch,
        }
        per_layer = self._prepare_per_layer_inputs_for_cp(input_ids, image_mask)
        if per_layer is not None:
            out["per_layer_inputs"] = per_layer
        return out

    def setup_cp_attention(self, cp_mesh: Any) -> None:
        """Install the model-owned CP attention over `cp_mesh` on every text attention layer
        (idempotent; see `am_models_gemma4.cp`)."""
        setup_cp_attention(self, cp_mesh)

    def _cp_shard_batch(
        self,
        cp_mesh: Any,
        tp_mesh: Any,
        batch: dict[str, Any],
        loss_mask: torch.Tensor | None = None,
        padding_token_id: int = 0,
    ) -> dict[str, Any]:
        """This CP rank's load-balanced share of a batch (installs the CP attention first).

        Sequence tensors (`inputs_embeds`, `position_ids`, `per_layer_inputs`, `loss_mask`)
        keep chunks r and 2N-1-r; `labels` are shifted on the full sequence and returned as
        `shift_labels`; `input_ids` are dropped (the embeddings replace them). `tp_mesh` and
        `padding_token_id` are accepted for the recipe's interface and unused.
        """
        self.setup_cp_attention(cp_mesh)
        if "inputs_embeds" not in batch:
            raise ValueError(
                "_cp_shard_batch needs inputs_embeds (from prepare_model_inputs_for_cp)"
            )
        seq = batch["inputs_embeds"].shape[1]
        index = load_balanced_indices(seq, cp_mesh.size(), cp_mesh.get_local_rank())
        index = index.to(batch["inputs_embeds"].device)
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "_cp_make_batch_fn")}
        if "position_ids" not in out:
            out["position_ids"] = torch.arange(seq, device=index.device)[None]
        labels = out.pop("labels", None)
        if labels is not None:
            out["shift_labels"] = next_token_targets(labels)
        if loss_mask is not None:
            out["loss_mask"] = loss_mask
        for key in (
            "inputs_embeds",
            "position_ids",
            "per_layer_inputs",
            "shift_labels",
            "loss_mask",
        ):
            if key in out and out[key] is not None:
                out[key] = out[key].index_select(1, index)
        return out
