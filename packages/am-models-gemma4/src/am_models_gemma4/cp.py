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
sends each block's dK/dV around with it until it is home. Masks use per-token metadata
ringed with the K/V (`am_cp_meta` [3, B, S], built on the full sequence by
`prepare_model_inputs_for_cp` and sharded with the batch): global position (causal, and the
sliding window), document id (packed rows: no token attends across documents; padding,
id 0, is its own document) and image-block id (with bidirectional vision attention a
sliding layer's image token sees its whole image). K/V-shared layers read their source
layer's local K/V from the per-forward store and ring them the same way, so sharing holds
under CP. Limits: no attention dropout; the block math is plain matmuls in fp32 (no fused
kernel), and sends are not overlapped with compute.

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


def _allowed(q_meta: Tensor, k_meta: Tensor, window: int | None, images: bool) -> Tensor:
    """[B, 1, S_q, S_k] True where a query may attend a key.

    `*_meta` [3, B, S]: global position, document id (0 = padding, its own document) and
    image-block id (0 = text) of each token. Same document AND causal by global position;
    sliding layers (`window`) also need the key less than `window` positions back; with
    `images` (bidirectional vision attention, sliding layers) a key of the query's own image
    is allowed ahead of it too (transformers' vision mask rule, as in
    `_build_packed_gemma4_causal_mask_mapping`).
    """
    q_pos, q_doc, q_img = (t[:, :, None] for t in q_meta)
    k_pos, k_doc, k_img = (t[:, None, :] for t in k_meta)
    allowed = k_pos <= q_pos
    if images:
        allowed = allowed | ((q_img == k_img) & (q_img > 0))
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    return (allowed & (q_doc == k_doc))[:, None]


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

    q, k, v: [B, H, S, D] (k/v already expanded to H heads); meta: [3, B, S] (global
    position, document id, image-block id of every local token, see `_allowed`).
    """

    @staticmethod
    def forward(ctx, q, k, v, meta, window, scale, group, images):
        size = dist.get_world_size(group)
        qf = q.float()
        out = torch.zeros_like(qf)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        kb, vb, pb = k, v, meta
        for step in range(size):
            nxt = _exchange([kb, vb, pb], group) if step < size - 1 else None
            scores = torch.matmul(qf, kb.float().transpose(-1, -2)) * scale
            scores = scores.masked_fill(~_allowed(meta, pb, window, images), float("-inf"))
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
        ctx.save_for_backward(q, k, v, meta, out, lse)
        ctx.window, ctx.scale, ctx.group, ctx.images = window, scale, group, images
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, meta, out, lse = ctx.saved_tensors
        size = dist.get_world_size(ctx.group)
        qf, do = q.float(), grad_out.float()
        delta = (do * out).sum(dim=-1, keepdim=True)
        dq = torch.zeros_like(qf)
        kb, vb, pb = k, v, meta
        dkb, dvb = (
            torch.zeros_like(k, dtype=torch.float32),
            torch.zeros_like(v, dtype=torch.float32),
        )
        for _ in range(size):
            kf = kb.float()
            scores = torch.matmul(qf, kf.transpose(-1, -2)) * ctx.scale
            allowed = _allowed(meta, pb, ctx.window, ctx.images)
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
            dvb = dvb + torch.matmul(probs.transpose(-1, -2), do)
            dscores = probs * (torch.matmul(do, vb.float().transpose(-1, -2)) - delta)
            dq = dq + torch.matmul(dscores, kf) * ctx.scale
            dkb = dkb + torch.matmul(dscores.transpose(-1, -2), qf) * ctx.scale
            kb, vb, pb, dkb, dvb = _exchange([kb, vb, pb, dkb, dvb], ctx.group)
        # After N steps every block (and its accumulated dK/dV) is back at its owner.
        return dq.to(q.dtype), dkb.to(k.dtype), dvb.to(v.dtype), None, None, None, None, None


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
    cp_meta: Tensor | None = None,
    bidirectional_images: bool = False,
    **_: Any,
) -> tuple[Tensor, None]:
    """q [B, H, S, D] local, k/v [B, Hkv, S, D] local -> [B, S, H, D], attending over every
    CP rank's keys (p2p ring). `cp_meta` [3, B, S] (from `_cp_shard_batch`: global
    positions, document ids, image-block ids) decides the mask; without it every row is
    one document of text at `position_ids`."""
    group = getattr(module, "_am_cp_group", None)
    if group is None or (position_ids is None and cp_meta is None):
        raise RuntimeError(
            "the CP attention needs setup_cp_attention(cp_mesh) and the batch of "
            "_cp_shard_batch (global positions and document ids of this rank's tokens)"
        )
    if dropout:
        raise ValueError(f"the CP attention has no dropout (got attention_dropout={dropout})")
    if cp_meta is None:
        positions = position_ids.reshape(-1, position_ids.shape[-1]).expand(query.shape[0], -1)
        cp_meta = torch.stack([positions, torch.ones_like(positions), torch.zeros_like(positions)])
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    meta = cp_meta.to(query.device, torch.long).contiguous()
    out = _RingAttention.apply(
        query, key, value, meta, sliding_window, scale, group, bidirectional_images
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
        position_ids: torch.Tensor | None = None,
        packed_seq_ids: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Embeddings of the full sequence before CP sharding: `inputs_embeds`,
        `position_ids`, `per_layer_inputs` (when the model has them), `am_cp_meta` (what the
        ring attention masks by) and `_cp_make_batch_fn` (this model's `_cp_shard_batch`,
        which also installs the CP attention).

        Packed rows: `packed_seq_ids` [B, S] (1-based document ids, 0 = padding, as for
        `_build_packed_gemma4_causal_mask_mapping`), or `position_ids` that restart at each
        document (transformers' packing convention); no token attends across documents,
        RoPE positions restart per document, and `labels` get no target across a boundary.
        """
        image_mask = self._get_special_image_mask(input_ids, mm_token_type_ids)
        docs = _document_ids(input_ids, position_ids, packed_seq_ids)
        if position_ids is None:
            position_ids = _positions_in_documents(docs)
        out: dict[str, Any] = {
            "inputs_embeds": self.prepare_inputs_embeds_for_cp(
                input_ids, pixel_values, image_position_ids, mm_token_type_ids
            ),
            "position_ids": position_ids,
            "am_cp_meta": _cp_meta(docs, image_mask),
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
        embeds = batch["inputs_embeds"]
        seq = embeds.shape[1]
        index = load_balanced_indices(seq, cp_mesh.size(), cp_mesh.get_local_rank())
        index = index.to(embeds.device)
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "_cp_make_batch_fn")}
        if out.get("am_cp_meta") is None:  # a batch not from prepare_model_inputs_for_cp
            rows = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out["am_cp_meta"] = _cp_meta(rows, torch.zeros_like(rows, dtype=torch.bool))
        if out.get("position_ids") is None:
            out["position_ids"] = _positions_in_documents(out["am_cp_meta"][1])
        labels = out.pop("labels", None)
        if labels is not None:
            out["shift_labels"] = next_token_targets(labels, seq_idx=out["am_cp_meta"][1])
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
        out["am_cp_meta"] = out["am_cp_meta"].index_select(2, index)
        return out


def _document_ids(
    input_ids: Tensor, position_ids: Tensor | None, packed_seq_ids: Tensor | None
) -> Tensor:
    """[B, S] document ids: `packed_seq_ids` as given, else a new document wherever
    `position_ids` does not continue by one, else one document per row."""
    shape = input_ids.shape
    if packed_seq_ids is not None:
        if packed_seq_ids.shape != shape:
            raise ValueError(
                f"packed_seq_ids shape {tuple(packed_seq_ids.shape)} must equal input_ids' "
                f"{tuple(shape)}"
            )
        return packed_seq_ids.long().to(input_ids.device)
    if position_ids is None:
        return torch.ones(shape, dtype=torch.long, device=input_ids.device)
    positions = position_ids.reshape(-1, shape[-1]).expand(shape[0], -1).to(input_ids.device)
    starts = torch.ones(shape, dtype=torch.bool, device=input_ids.device)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return starts.long().cumsum(1)


def _positions_in_documents(docs: Tensor) -> Tensor:
    """[B, S] RoPE positions restarting at 0 at every document start."""
    index = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    start_of = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return index - start_of


def _cp_meta(docs: Tensor, image_mask: Tensor) -> Tensor:
    """[3, B, S] long: global position, document id and image-block id (each contiguous run
    of image tokens its own id, 0 for text) of every token, for the ring attention's mask."""
    image_mask = image_mask.to(docs.device, torch.bool)
    starts = image_mask.clone()
    starts[:, 1:] &= ~image_mask[:, :-1]
    blocks = torch.where(image_mask, starts.long().cumsum(1), torch.zeros_like(docs))
    positions = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    return torch.stack([positions, docs.long(), blocks])
