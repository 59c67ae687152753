"""Nemotron-H's checks of its inputs at the model boundary, and reference-style argument handling.

`check_model_inputs` runs once per forward of `NemotronV3Model` (so also under
`NemotronHForCausalLM` and on every pipeline stage): token ids, embeddings, masks and
packing boundaries must match each other and the cache, else a `ValueError` names the
argument and what is accepted. Value checks follow `am_utils.validation.values_checkable`
(always on CPU; on GPUs only with `AM_VALIDATE_INPUTS=1`, since they would cost a sync).

`split_positional` reads `forward(input_ids, *mtp_embed_inputs, ...)`'s positional tail:
with MTP off a transformers-style `model(ids, mask)` takes its second argument as the
attention mask, as transformers does; with MTP on those positions are the MTP embeddings
and anything else there is an error naming the problem.
"""

from __future__ import annotations

from typing import Any

import torch

from am_utils.validation import (
    check_cu_seqlens,
    check_input_ids,
    check_logits_to_keep,
    check_mask_shape,
    check_seq_idx,
    warn_unknown_kwargs,
)

# Packing / THD keywords of the reference's forward (several are accepted and unused here).
PACKING_KWARGS: tuple[str, ...] = (
    "qkv_format",
    "cu_seqlens",
    "cu_seqlens_padded",
    "max_seqlen",
    "seq_idx",
    "cp_rank",
    "cp_size",
    "_packed_seq_ids",
    "padding_mask",
)

# Passed by transformers' generate() / Trainer and accepted by NemotronHForCausalLM.forward.
# output_attentions / output_router_logits are accepted as False only (see check_output_flags).
HF_CALLER_KWARGS: tuple[str, ...] = (
    "num_items_in_batch",
    "output_attentions",
    "output_router_logits",
)


def split_positional(
    mtp_layers: int,
    positional: tuple,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    hidden_size: int,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """(mtp_embed_inputs, attention_mask) from the positional arguments after `input_ids`."""
    if not positional:
        return (), attention_mask
    if mtp_layers:
        for i, value in enumerate(positional):
            if not _is_mtp_embedding(value, input_ids, hidden_size):
                raise TypeError(
                    f"forward(input_ids, *mtp_embed_inputs): with MTP on "
                    f"(num_nextn_predict_layers={mtp_layers}) the positional arguments after "
                    f"input_ids are the per-depth MTP embeddings [..., {hidden_size}]; "
                    f"positional argument {i + 2} is {_describe(value)}. Pass attention_mask "
                    "(and other inputs) by keyword"
                )
        return tuple(positional), attention_mask
    if len(positional) > 1:
        raise TypeError(
            f"forward takes input_ids and at most one more positional argument (attention_mask, "
            f"as in transformers) when MTP is off; got {len(positional) + 1}. Pass the others "
            "by keyword"
        )
    (mask,) = positional
    if attention_mask is not None:
        raise TypeError("forward got attention_mask both positionally and by keyword")
    if mask is not None and _is_mtp_embedding(mask, input_ids, hidden_size):
        raise TypeError(
            f"forward got {_describe(mask)} as its second positional argument: MTP embeddings, "
            "but this model has no MTP heads (num_nextn_predict_layers=0). The second "
            "positional argument is attention_mask"
        )
    return (), mask


def _is_mtp_embedding(value: Any, input_ids: torch.Tensor | None, hidden_size: int) -> bool:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    if input_ids is None:
        return value.shape[-1] == hidden_size
    # Token ids [B, S] (or packed [T]) take [..., H] embeddings; on a later pipeline stage
    # input_ids is itself the hidden states [B, S, H].
    want = input_ids.dim() + (0 if input_ids.is_floating_point() else 1)
    return value.dim() == want and value.shape[-1] == hidden_size


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def check_output_flags(kwargs: dict[str, Any]) -> None:
    """Accept transformers' output_attentions / output_router_logits when False; these
    kernels do not produce attention probabilities or return router logits."""
    for name in ("output_attentions", "output_router_logits"):
        if kwargs.get(name):
            raise ValueError(
                f"{name}=True is not supported by NemotronHForCausalLM (its attention kernels "
                "do not materialize probabilities; router logits are not returned)"
            )


def causal_lm_kwargs(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """The keyword arguments to hand to the base model: unknown ones are warned about (once)
    and dropped, transformers' caller-only ones are checked and dropped."""
    check_output_flags(kwargs)
    unknown = warn_unknown_kwargs(kwargs, PACKING_KWARGS + HF_CALLER_KWARGS, where)
    drop = set(unknown) | set(HF_CALLER_KWARGS)
    return {k: v for k, v in kwargs.items() if k not in drop}


def check_model_inputs(
    model: Any,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Any,
    kwargs: dict[str, Any],
) -> None:
    """Shapes, dtypes and (where cheap) values of one forward's inputs; see the module doc."""
    packed = kwargs.get("cu_seqlens") is not None or kwargs.get("seq_idx") is not None
    hidden = model.config.hidden_size
    if inputs_embeds is not None:
        _check_embeddings("inputs_embeds", inputs_embeds, hidden, packed)
        first = inputs_embeds
    elif input_ids is not None and input_ids.is_floating_point() and model.embed_tokens is None:
        _check_embeddings(
            "input_ids (hidden states of the previous stage)", input_ids, hidden, packed
        )
        first = input_ids
    elif input_ids is not None:
        check_input_ids(input_ids, model.config.vocab_size, allow_1d=packed)
        first = input_ids
    else:
        raise ValueError("NemotronV3Model.forward needs input_ids or inputs_embeds")
    thd = first.dim() == (2 if first.is_floating_point() else 1)
    batch, seq = (1, first.shape[0]) if thd else (first.shape[0], first.shape[1])
    past = cache.get_seq_length() if cache is not None else 0
    _check_masks(attention_mask, kwargs.get("padding_mask"), batch, seq, past, thd)
    _check_packing(kwargs, batch, seq)


def _check_embeddings(name: str, x: torch.Tensor, hidden: int, packed: bool) -> None:
    dims = (3, 2) if packed else (3,)
    if x.dim() not in dims or x.shape[-1] != hidden or not x.is_floating_point():
        accepted = f"[batch, seq, {hidden}]" + (f" or packed [T, {hidden}]" if packed else "")
        raise ValueError(f"{name} must be a floating {accepted} tensor; got {_describe(x)}")


def _check_masks(attention_mask, padding_mask, batch: int, seq: int, past: int, thd: bool):
    total = past + seq
    if attention_mask is not None and attention_mask.dim() == 4:
        check_mask_shape(
            attention_mask, "attention_mask (4-D)", [(b, 1, seq, total) for b in (batch, 1)]
        )
    else:
        shapes = [(seq,)] if thd else [(batch, total)]
        check_mask_shape(attention_mask, "attention_mask", shapes + [(batch, total)])
    check_mask_shape(
        padding_mask, "padding_mask", ([(seq,)] if thd else []) + [(batch, total), (batch, seq)]
    )


def _check_packing(kwargs: dict[str, Any], batch: int, seq: int) -> None:
    cu = kwargs.get("cu_seqlens")
    if cu is not None:
        if batch != 1:
            raise ValueError(
                f"cu_seqlens describes one packed row ([1, T] input); got a batch of {batch} "
                "rows. Pass seq_idx [batch, seq] for several rows of packed sequences"
            )
        check_cu_seqlens(cu, seq)
    if kwargs.get("seq_idx") is not None:
        check_seq_idx(kwargs["seq_idx"], batch, seq)


__all__ = [
    "HF_CALLER_KWARGS",
    "PACKING_KWARGS",
    "causal_lm_kwargs",
    "check_logits_to_keep",
    "check_model_inputs",
    "split_positional",
]
