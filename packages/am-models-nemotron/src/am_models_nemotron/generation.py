"""transformers `generate()` glue for NemotronHForCausalLM: the hybrid cache and input checks.

The cache (`NemotronHybridCache`: KV buffers + Mamba conv/SSM state) is built in
`prepare_inputs_for_generation`, not by generate(), and each decoding step forwards only
the tokens not yet cached.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation import GenerationMixin

from am_models_nemotron.cache import NemotronHybridCache
from am_utils.masks import causal_mask, to_additive_mask
from am_utils.validation import check_generate_inputs


class NemotronHGenerationMixin(GenerationMixin):
    """GenerationMixin with Nemotron-H's hybrid cache and prompt checks."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The hybrid cache is built in prepare_inputs_for_generation, not by generate().
        return False

    def get_experts_implementation(self) -> dict:
        """No transformers experts kernels to switch during decoding (am-moe owns the experts)."""
        return {}

    def set_experts_implementation(self, *_: Any, **__: Any) -> None:
        """Accepted for GenerationMixin; am-moe experts have no transformers implementation switch."""

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' `generate()`, after checking the prompt: [batch, seq] ids with seq > 0
        (or `inputs_embeds`) and an attention mask of the prompt's shape."""
        ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        check_generate_inputs(ids, kwargs.get("attention_mask"), kwargs.get("inputs_embeds"))
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values: NemotronHybridCache | None = None,
        cache_position: torch.LongTensor | None = None,
        use_cache: bool | None = True,
        **kwargs: Any,
    ) -> dict:
        """Prefill: new cache and the whole prompt. Decode: only the tokens not yet cached.

        A prompt given as `inputs_embeds` (with the empty `input_ids` generate() passes) is
        forwarded as `inputs_embeds` with `input_ids=None` on the first step; the new
        positions (`cache_position`, and `position_ids` when generate() passes them) come
        from the length of what is forwarded. `next_sequence_length` (transformers 5) is the
        number of new tokens; without it the tokens beyond the cache's length are the new
        ones. Other keyword arguments (e.g. `output_hidden_states`) reach `forward`.
        """
        kwargs.pop("labels", None)
        new = kwargs.pop("next_sequence_length", None)
        first = not isinstance(past_key_values, NemotronHybridCache)
        # Without a cache only generate()'s is_first_iteration tells the prefill apart.
        first_step = kwargs.pop("is_first_iteration", None)
        first_step = first and (bool(first_step) if first_step is not None else bool(use_cache))
        if first and use_cache:
            batch = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
            past_key_values = NemotronHybridCache.for_model(self.model, batch)
        past = 0 if first else past_key_values.get_seq_length()
        inputs: dict[str, Any] = {
            "attention_mask": attention_mask,
            "past_key_values": past_key_values if use_cache else None,
            "use_cache": use_cache,
            "logits_to_keep": 1,
        }
        if inputs_embeds is not None and first_step:
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = inputs_embeds
            n_new = inputs_embeds.shape[1]
        elif inputs_embeds is not None and not use_cache:
            raise ValueError(
                "generate(inputs_embeds=...) needs use_cache=True: without a cache the prompt "
                "embeddings would be dropped after the first step"
            )
        else:
            if use_cache and not first:
                n_new = new if new is not None else input_ids.shape[1] - past
            else:
                n_new = input_ids.shape[1]
            inputs["input_ids"] = input_ids[:, input_ids.shape[1] - n_new :]
        device = (inputs_embeds if inputs["input_ids"] is None else input_ids).device
        inputs["cache_position"] = torch.arange(past, past + n_new, device=device)
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            inputs["position_ids"] = position_ids[..., position_ids.shape[-1] - n_new :]
        for key, value in kwargs.items():
            inputs.setdefault(key, value)
        return inputs

    @staticmethod
    def _make_causal_mask(
        query_len: int, kv_len: int, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Additive [B, 1, Q, K] mask: lower-triangular for prefill, all zeros for a decode row."""
        allowed = causal_mask(query_len, kv_len, device=device)
        return to_additive_mask(allowed, dtype).expand(batch_size, 1, query_len, kv_len).clone()
