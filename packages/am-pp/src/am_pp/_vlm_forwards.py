"""Pipeline-stage forwards for VLM top-level models (Gemma 4, Mistral 3).

Stage 0 embeds the text tokens, runs the vision tower (+ projector) and scatters the image
features into the image-token slots, then runs its share of the (patched) text backbone.
Later stages take hidden states positionally and run theirs; the last applies `lm_head`.
Images arrive as forward kwargs of the first stage (one microbatch's images per call, e.g.
via the schedule's `kwarg_mbs`), or, when the training loop pre-chunks them, from
`model._vlm_pixel_values_chunks` (consumed one entry per stage-0 call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from am_pp._forwards import lm_head_or_hidden, reject_unused


def _is_token_ids(x) -> bool:
    return x is not None and not x.is_floating_point()


def _next_chunk(model: nn.Module, name: str, given):
    """`given` if passed, else the next pre-chunked entry of `model._vlm_<name>_chunks`."""
    if given is not None:
        return given
    chunks = getattr(model, f"_vlm_{name}_chunks", None)
    return chunks.pop(0) if chunks else None


def _scatter_features(inputs_embeds, slot_mask, features: torch.Tensor) -> torch.Tensor:
    n_slots = int(slot_mask.sum())
    if n_slots * inputs_embeds.shape[-1] != features.numel():
        raise ValueError(
            f"image features ({features.shape[0]} rows) do not match the {n_slots} image tokens"
        )
    mask = slot_mask.unsqueeze(-1).expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))


def _image_features(out) -> torch.Tensor:
    return torch.cat(out.pooler_output, dim=0)


def create_vlm_stage_forward(name: str, image_inputs: tuple[str, ...], embed_first_stage):
    """A VLM stage forward. On the first stage (token ids in, the text embeddings here)
    `embed_first_stage(model, input_ids, **images) -> (inputs_embeds, extra text kwargs)`
    embeds the tokens and merges the images (`images`: the `image_inputs` keywords, each
    given or the next pre-chunked entry); every stage then runs its share of the patched
    language model and the last one `lm_head`."""

    def forward(
        self,
        input_ids=None,
        *carried,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        cache_position=None,
        **kwargs,
    ) -> torch.Tensor:
        given = {k: kwargs.pop(k, None) for k in image_inputs}
        reject_unused(kwargs, name)
        lm = self.model.language_model
        extra = {}
        if _is_token_ids(input_ids) and lm.embed_tokens is not None:
            images = {k: _next_chunk(self, k, v) for k, v in given.items()}
            inputs_embeds, extra = embed_first_stage(self, input_ids, **images)
            input_ids = None
        h = lm(
            input_ids, *carried, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, cache_position=cache_position, **extra,
        )  # fmt: skip
        return lm_head_or_hidden(self, h)

    forward.__qualname__ = f"{name}.pipeline_forward"
    return forward


def _embed_mistral3(self, ids, pixel_values=None, image_sizes=None, vision_feature_layer=None):
    embeds = self.model.language_model.embed_tokens(ids)
    if pixel_values is not None:
        layer = vision_feature_layer
        layer = self.config.vision_feature_layer if layer is None else layer
        out = self.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes, vision_feature_layer=layer,
            return_dict=True,
        )  # fmt: skip
        slots = ids == self.config.image_token_id
        embeds = _scatter_features(embeds, slots, _image_features(out))
    return embeds, {}


def _embed_gemma4(self, ids, pixel_values=None, image_position_ids=None):
    lm = self.model.language_model
    image_mask, video_mask, audio_mask = self.model.get_placeholder_mask(ids, None)
    text_config = self.config.get_text_config()
    text_ids = torch.where(image_mask | video_mask | audio_mask, text_config.pad_token_id, ids)
    embeds = lm.embed_tokens(text_ids)
    extra = {}
    if getattr(text_config, "hidden_size_per_layer_input", 0):
        extra["per_layer_inputs"] = lm.get_per_layer_inputs(text_ids, None)
    if pixel_values is not None:
        out = self.model.get_image_features(pixel_values, image_position_ids, return_dict=True)
        embeds = _scatter_features(embeds, image_mask, _image_features(out))
    return embeds, extra


def create_pipeline_forward_mistral3_vlm() -> Callable:
    """Pipeline-compatible forward for Mistral3ForConditionalGeneration (VLM top-level).

    Stage 0: embeds text tokens, runs vision_tower + multi_modal_projector
    (`get_image_features`) for `pixel_values`/`image_sizes`, merges the features at the image
    tokens with `masked_scatter`, then runs the patched language model. Other stages pass
    hidden states through theirs. Last stage: `lm_head`."""
    return create_vlm_stage_forward(
        "Mistral3ForConditionalGeneration",
        ("pixel_values", "image_sizes", "vision_feature_layer"),
        _embed_mistral3,
    )


def create_pipeline_forward_gemma4_vlm() -> Callable:
    """Pipeline-compatible forward for Gemma4ForConditionalGeneration (VLM top-level).

    Stage 0: embeds text tokens (multimodal placeholders embedded as the pad token, as
    transformers does), computes the per-layer inputs from those token ids when the model has
    them (E2B / E4B), merges image features from the vision tower + `embed_vision` (if
    `pixel_values` are given or stored in `_vlm_pixel_values_chunks`), then calls the patched
    language model. Non-first stages pass hidden states through theirs. Last stage: lm_head
    and final-logit softcapping. Video and audio inputs are rejected, not dropped."""
    return create_vlm_stage_forward(
        "Gemma4ForConditionalGeneration", ("pixel_values", "image_position_ids"), _embed_gemma4
    )
