"""Gemma 4 (MoE, dense with K/V sharing, vision) on transformers' Gemma 4 with am-moe experts.

`Gemma4ForConditionalGeneration` *is* transformers' `Gemma4ForConditionalGeneration`
(same modules, names, vision tower, embedding merge, masks and `generate()`), with:

- MoE checkpoints (`text_config.enable_moe_block=True`): the language model is
  `Gemma4MoETextModelBackend`, whose MoE blocks are am-moe `MoE` instances
  (`Gemma4MoE`: grouped experts, expert parallelism through am-moe's parallelizer) and
  whose router is `Gemma4Gate` (transformers' routing math exactly). transformers' own
  text model is never built for them (it would allocate a second set of experts).
- Dense checkpoints (31B; E2B/E4B with audio and K/V sharing): transformers' text model.
- Our checkpoint I/O (`HFCheckpointingMixin`): `from_pretrained` reads what transformers'
  `save_pretrained` writes (sharded or not) through `Gemma4StateDictAdapter`, dropping the
  dead K/V weights of released E2B/E4B checkpoints by name; `save_pretrained` writes what
  transformers loads with no missing or unexpected key.
- One parameter dtype: a float32 config gives float32 parameters everywhere (vision tower
  and embedders included); RoPE buffers stay float32 (`_keep_in_fp32_modules`).
- `tie_weights()` follows the top-level `tie_word_embeddings` and re-points `lm_head` at
  the active embedding (after the MoE swap, `initialize_weights`, or a meta build).
- The loss is next-token cross-entropy in fp32 over the (soft-capped) logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4CausalLMOutputWithPast,
    Gemma4MultimodalEmbedder,
    Gemma4PreTrainedModel,
)
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4ForConditionalGeneration as HFGemma4ForConditionalGeneration,
)
from transformers.models.gemma4.modeling_gemma4 import Gemma4Model as HFGemma4Model

from am_dtype.backend import BackendConfig
from am_dtype.cpu_gemm import CpuGemmLinear
from am_dtype.dtypes import config_dtype
from am_dtype.fp8 import fp8_autocast_forward
from am_models_gemma4.attention import TE_MASK, Gemma4Attention, _TEBoundaries, use_backend_linears
from am_models_gemma4.cp import Gemma4CPMixin
from am_models_gemma4.kv_sharing import _kv_sharing_active
from am_models_gemma4.layers import (
    MLP_LINEARS,
    Gemma4MoEDecoderLayer,
    Gemma4MoETextModelBackend,
)
from am_models_gemma4.masks import _convert_bool_4d_mask_to_additive, _derive_padding_mask
from am_models_gemma4.moe import Gemma4Gate
from am_models_gemma4.state_dict_adapter import Gemma4StateDictAdapter
from am_moe.config import MoEConfig
from am_moe.experts import GroupedExperts
from am_moe.fsdp_mixin import MoEFSDPSyncMixin
from am_utils.checkpointing import HFCheckpointingMixin
from am_utils.loss import causal_lm_loss, target_cross_entropy

__all__ = ["Gemma4ForConditionalGeneration", "Gemma4MoEModel", "ModelCapabilities", "ModelClass"]

# BackendConfig.attn -> the transformers attention implementation the text config carries:
# it decides the masks transformers builds (bool "sdpa" masks for the dense-mask kernels; the
# same masks, checked and turned into boundaries, for "te"). The attention itself is always
# `Gemma4Attention`'s am_utils kernel.
ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "sdpa", "flex": "sdpa", "te": TE_MASK}


def _check_backend(backend: BackendConfig) -> None:
    """Reject the BackendConfig choices Gemma 4 has no implementation for, with the reason."""
    if backend.attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"BackendConfig.attn={backend.attn!r} is not supported by Gemma 4; "
            f"accepted: {sorted(ATTN_IMPLEMENTATIONS)}"
        )
    if backend.rms_norm != "torch_fp32":
        raise ValueError(
            f"BackendConfig.rms_norm={backend.rms_norm!r} is not supported by Gemma 4: its "
            "RMSNorms (weighted, unweighted and per-head) compute in fp32 exactly as "
            "transformers does, which is rms_norm='torch_fp32' (the default); use that"
        )


def _register_te_mask() -> None:
    """transformers' mask registry entry for attn="te": the bool masks "sdpa" gets."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if TE_MASK not in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(TE_MASK, sdpa_mask)
    if TE_MASK not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(TE_MASK, _te_attention_interface)


def _te_attention_interface(module, *args, **kwargs):
    raise RuntimeError(
        f"{type(module).__name__} has no am attention kernel: attn='te' runs only in the text "
        "layers' Gemma4Attention (the vision and audio towers keep their own attention)"
    )


@dataclass(frozen=True)
class ModelCapabilities:
    """What one Gemma 4 checkpoint supports, decided from its config alone."""

    variant: str  # "moe", "dense_audio" or "dense"
    moe: bool
    audio: bool
    vision: bool
    kv_sharing: bool
    expert_parallel: bool
    context_parallel: bool = True
    generation: bool = True


def _init_am_module(module: nn.Module, std: float) -> None:
    """Initialize the modules transformers' `_init_weights` does not know (ours)."""
    if isinstance(module, Gemma4Gate):
        module.init_weights(None, std)
    elif isinstance(module, GroupedExperts):
        module.init_weights(None, std)
    elif isinstance(module, Gemma4MoEDecoderLayer):
        nn.init.ones_(module.layer_scalar)


class Gemma4MoEModel(HFGemma4Model):
    """transformers' `Gemma4Model` (vision / audio towers, embedders, language model) built
    with `Gemma4MoETextModelBackend` as the language model for MoE configs; exposes the
    language model's `layers`, `embed_tokens` and `norm` for training loops."""

    def __init__(
        self,
        config: Any,
        backend: BackendConfig | None = None,
        moe_config: MoEConfig | None = None,
        moe_overrides: dict | None = None,
    ) -> None:
        # transformers' Gemma4Model.__init__ would build its own MoE text model first.
        Gemma4PreTrainedModel.__init__(self, config)
        backend = backend or BackendConfig()
        text = config.text_config
        self.vocab_size = text.vocab_size
        self.vocab_size_per_layer_input = text.vocab_size_per_layer_input
        self.vision_tower = _maybe(AutoModel.from_config, config.vision_config)
        self.audio_tower = _maybe(AutoModel.from_config, config.audio_config)
        self.embed_vision = _maybe(
            lambda c: Gemma4MultimodalEmbedder(c, text), config.vision_config
        )
        self.embed_audio = _maybe(lambda c: Gemma4MultimodalEmbedder(c, text), config.audio_config)
        if text.enable_moe_block:
            self.language_model = Gemma4MoETextModelBackend(
                text, backend, moe_config, moe_overrides
            )
        else:
            self.language_model = AutoModel.from_config(text)
            dtype = config_dtype(text)
            for i, layer in enumerate(self.language_model.layers):
                layer.self_attn = Gemma4Attention(text, i, backend)
                use_backend_linears(layer.mlp, MLP_LINEARS, backend, dtype)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_am_module(module, self.config.get_text_config().initializer_range)

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def embed_tokens(self) -> nn.Module:
        return self.language_model.embed_tokens

    @property
    def norm(self) -> nn.Module:
        return self.language_model.norm


def _is_2d(mask: Any) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 2


def _maybe(build, config):
    return build(config) if config is not None else None


def _apply_text_overrides(config: Any, overrides: dict | None) -> None:
    if not overrides:
        return
    text = config.text_config
    unknown = sorted(k for k in overrides if not hasattr(text, k))
    if unknown:
        raise ValueError(f"text_config overrides name unknown Gemma4TextConfig fields {unknown}")
    for key, value in overrides.items():
        setattr(text, key, value)


class Gemma4ForConditionalGeneration(
    HFCheckpointingMixin, Gemma4CPMixin, HFGemma4ForConditionalGeneration, MoEFSDPSyncMixin
):
    """Gemma 4 for conditional generation (text, images) with am-moe MoE blocks.

    `Gemma4ForConditionalGeneration(config, moe_config=None, backend=None, text_config=None)`:
    `moe_config` replaces the MoEConfig derived from the text config (`moe_overrides=`
    changes single fields), `text_config` is a dict of text-config fields to override
    before building, and `backend` (default `BackendConfig()`, whatever the device) picks
    the kernels. Every field is read:

    - `attn` (sdpa / eager / flex / te), `compile_attn`: the am_utils attention kernel of
      every text attention layer (`Gemma4Attention`); the vision and audio towers keep
      transformers' bidirectional attention. "te" takes causal (windowed) attention over
      the real tokens of a padded batch; batches that need another pattern (images,
      packed documents, custom masks) are rejected with the kernels that take them;
    - `linear`: the text layers' q/k/v/o and dense-MLP projections (the per-layer-input
      projections and the towers stay torch Linear). "torch" builds `CpuGemmLinear`s, as
      are the lm_head and the MoE router's projection: `nn.Linear`s whose fp32 CPU GEMMs
      run on `cpu_gemm`'s kernel (`am_dtype.cpu_gemm`), F.linear elsewhere;
    - `rope_fusion`: RoPE through `am_utils.rope` (TE's fused kernel when True);
    - `rms_norm`: only "torch_fp32" (Gemma 4's norms are transformers' fp32 math);
    - `te_fp8`: the forward runs under `am_dtype.fp8.fp8_autocast_forward`;
    - `experts`, `dispatcher*`, `fake_balanced_gate`, `fake_gate_noise`, `gate_precision`:
      the am-moe MoE blocks (MoE configs; dense ones have none); `gate_precision` is the
      router projection's dtype, its softmax stays fp32 as in transformers;
    - `enable_hf_state_dict_adapter`: builds `state_dict_adapter`;
      `enable_fsdp_optimizations`: `MoEFSDPSyncMixin`'s deferred gradient sync.
    """

    _keep_in_fp32_modules = ["rotary_emb"]
    # Transformer Engine modules (linear="te") carry an `_extra_state` entry that
    # transformers' checkpoints do not: absent on load, not written on save.
    _checkpoint_optional_keys = (r"\._extra_state$",)

    def __init__(
        self,
        config: Any,
        moe_config: MoEConfig | None = None,
        backend: BackendConfig | None = None,
        text_config: dict | None = None,
        **kwargs: Any,
    ) -> None:
        moe_overrides = kwargs.pop("moe_overrides", None)
        if kwargs:
            raise TypeError(
                f"Gemma4ForConditionalGeneration got unexpected keyword arguments {sorted(kwargs)}"
            )
        _apply_text_overrides(config, text_config)
        backend = backend or BackendConfig()
        _check_backend(backend)
        if backend.attn == "te":
            _register_te_mask()
        self._am_ready = False  # transformers' post_init calls initialize_weights early
        Gemma4PreTrainedModel.__init__(self, config)
        self.backend = backend
        text = config.get_text_config()
        text._attn_implementation = ATTN_IMPLEMENTATIONS[backend.attn]
        self.model = Gemma4MoEModel(config, backend, moe_config, moe_overrides)
        self.lm_head = CpuGemmLinear(
            text.hidden_size, text.vocab_size, bias=False, cpu_gemm=backend.cpu_gemm
        )
        self.vocab_size = text.vocab_size
        self.pad_token_id = self._get_text_pad_token_id()
        self.post_init()
        self._am_ready = True
        self._cast_parameters(config_dtype(config))
        self.tie_weights()
        if backend.enable_hf_state_dict_adapter:
            self.state_dict_adapter = Gemma4StateDictAdapter(
                text, getattr(self.model.language_model, "moe_config", None), config_dtype(config)
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: Any,
        moe_config: MoEConfig | None = None,
        backend: BackendConfig | None = None,
        **kwargs: Any,
    ) -> Gemma4ForConditionalGeneration:
        """Build the model from a config (randomly initialized as transformers does)."""
        return cls(config, moe_config, backend, **kwargs)

    @classmethod
    def get_capabilities(cls, config: Any) -> ModelCapabilities:
        """Capabilities of a Gemma 4 config, without building a model.

        1. `text_config.enable_moe_block` -> "moe" (e.g. gemma-4-26B-A4B-it);
        2. else an `audio_config` -> "dense_audio" (gemma-4-E2B-it, gemma-4-E4B-it);
        3. else "dense" (gemma-4-31B-it).
        """
        text = config.text_config if hasattr(config, "text_config") else config
        moe = bool(getattr(text, "enable_moe_block", False))
        audio = getattr(config, "audio_config", None) is not None
        variant = "moe" if moe else ("dense_audio" if audio else "dense")
        return ModelCapabilities(
            variant=variant,
            moe=moe,
            audio=audio,
            vision=getattr(config, "vision_config", None) is not None,
            kv_sharing=_kv_sharing_active(text),
            expert_parallel=moe,
        )

    def _get_text_pad_token_id(self) -> int:
        """The text pad token id (text config first, then the top level); -1 when unset."""
        for cfg in (self.config.get_text_config(), self.config):
            value = getattr(cfg, "pad_token_id", None)
            if value is not None:
                return int(value)
        return -1

    def _cast_parameters(self, dtype: torch.dtype) -> None:
        """Every floating parameter in `dtype`, in place (keeps tied parameters one object)."""
        for param in self.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)

    def tie_weights(self, *_args: object, **_kwargs: object) -> None:
        """Tie `lm_head.weight` to the active text embedding when the config asks for it.

        The top-level `tie_word_embeddings` decides (transformers' rule); the text config's
        flag is read only when the top level has none. Extra arguments (transformers'
        `missing_keys`, `recompute_mapping`) are accepted and ignored.
        """
        tie = getattr(self.config, "tie_word_embeddings", None)
        if tie is None:
            tie = getattr(self.config.get_text_config(), "tie_word_embeddings", False)
        if tie and getattr(self, "lm_head", None) is not None:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @torch.no_grad()
    def initialize_weights(
        self, buffer_device: torch.device | None = None, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        """Initialize every weight as transformers does (ours included), sampled in fp32,
        then cast parameters to `dtype`; RoPE buffers are recomputed in fp32.

        Works on a model built under `am_utils.init_empty_weights()`: meta parameters are
        first allocated on `buffer_device` (default CPU).
        """
        if not getattr(self, "_am_ready", True):
            # transformers' post_init during __init__: its own init, no dtype change.
            super().initialize_weights()
            return
        if any(p.is_meta for p in self.parameters()):
            self.to_empty(device=buffer_device or torch.device("cpu"))
        for module in self.modules():
            module._is_hf_initialized = False
            for tensor in list(module.parameters(recurse=False)) + list(
                module.buffers(recurse=False)
            ):
                if tensor is not None:
                    tensor._is_hf_initialized = False
        self._cast_parameters(torch.float32)
        super().initialize_weights()
        self._cast_parameters(dtype)
        self.tie_weights()

    # ------------------------------------------------------------------ forward
    def _get_special_image_mask(
        self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, S] bool, True at image soft-token positions (`mm_token_type_ids == 1` when
        given, else `input_ids == config.image_token_id`)."""
        if mm_token_type_ids is not None:
            return mm_token_type_ids == 1
        return input_ids == self.config.image_token_id

    @fp8_autocast_forward  # under TE's FP8 autocast when backend.te_fp8 is set
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        padding_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        _pre_embed_only: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Gemma4CausalLMOutputWithPast:
        """Logits (soft-capped), optional loss, cache; transformers' forward plus:

        - `padding_mask` ([B, S] bool, True = padding; derived from a 2D or 4D
          `attention_mask` when not given) keeps padded tokens out of the MoE experts;
        - a 4D bool `attention_mask` (True = may attend) is converted to the additive form;
        - `_pre_embed_only=True` returns the merged text + image embeddings [B, S, D]
          (what context parallelism shards) without running the decoder;
        - the loss is next-token cross-entropy in fp32, -100 ignored.
        """
        if _pre_embed_only:
            return self.prepare_inputs_embeds_for_cp(
                input_ids, pixel_values, image_position_ids, mm_token_type_ids
            )
        shift_labels = kwargs.pop("shift_labels", None)
        if getattr(self, "_cp_enabled", False) and attention_mask is None:
            # CP attention masks by global position itself; no local masks to build.
            attention_mask = {"full_attention": None, "sliding_attention": None}
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            dtype = inputs_embeds.dtype if inputs_embeds is not None else self.dtype
            attention_mask = _convert_bool_4d_mask_to_additive(attention_mask, dtype)
        if self.backend.attn == "te":
            kwargs["am_te_boundaries"] = _TEBoundaries(
                attention_mask.bool() if _is_2d(attention_mask) else None
            )
        if self.config.get_text_config().enable_moe_block:
            if padding_mask is None and isinstance(attention_mask, torch.Tensor):
                padding_mask = _derive_padding_mask(attention_mask)
                # While decoding with a cache the 2D mask also covers the cached positions;
                # the MoE blocks see only the new tokens, which are its last columns.
                inputs = input_ids if input_ids is not None else inputs_embeds
                if inputs is not None and padding_mask.dim() == 2:
                    padding_mask = padding_mask[:, -inputs.shape[1] :]
            if padding_mask is not None:
                kwargs["padding_mask"] = padding_mask
        outputs = super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_position_ids=image_position_ids,
            past_key_values=past_key_values,
            mm_token_type_ids=mm_token_type_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        if labels is not None:
            outputs.loss = causal_lm_loss(outputs.logits, labels)
        elif shift_labels is not None:  # CP: targets shifted on the full sequence already
            outputs.loss = target_cross_entropy(outputs.logits, shift_labels)
        return outputs

    def prepare_inputs_embeds_for_cp(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, S, D] text embeddings with the image features merged at image positions."""
        inner = self.model
        image_mask = self._get_special_image_mask(input_ids, mm_token_type_ids)
        text_ids = torch.where(image_mask, self._get_text_pad_token_id(), input_ids)
        embeds = inner.get_input_embeddings()(text_ids)
        if pixel_values is None:
            return embeds
        features = inner.get_image_features(pixel_values, image_position_ids, return_dict=True)
        flat = torch.cat(features.pooler_output, dim=0).to(embeds.device, embeds.dtype)
        slots = int(image_mask.sum())
        if slots != flat.shape[0]:
            raise ValueError(
                f"{slots} image token positions but the vision tower gave {flat.shape[0]} "
                "image features"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), flat)

    # ------------------------------------------------------------------ generation
    def get_experts_implementation(self) -> dict:
        """No transformers experts kernels to switch (am-moe owns the experts)."""
        return {}

    def set_experts_implementation(self, *_: Any, **__: Any) -> None:
        """Accepted for GenerationMixin; am-moe experts have no transformers switch."""


ModelClass = Gemma4ForConditionalGeneration
