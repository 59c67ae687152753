"""Nemotron-H (Nemotron 3): a hybrid Mamba2 / attention / MLP / MoE causal language model.

Architecture choices (numerics match transformers' `NemotronHForCausalLM`):

- Block pattern: one block per entry of `config.layers_block_type`
  ("linear_attention" = Mamba2, "full_attention", "mlp", "moe") or of the
  legacy `hybrid_override_pattern` string ("M", "*", "-", "E").
- Every block is pre-norm residual, `x + mixer(norm(x))`, RMSNorm computed
  in fp32; a final RMSNorm follows the last block. No positional embedding:
  attention is position-free, the Mamba2 layers carry order.
- Attention: grouped-query heads, backends from `BackendConfig.attn`. Packed
  and padded batches reach sdpa / eager / flex as a dense mask and Transformer
  Engine ("te") as THD sequence boundaries (`cu_seqlens`), the same pattern.
- Mamba2: chunked SSD scan in PyTorch on CPU, mamba-ssm kernels on GPU;
  packed sequences (`seq_idx` / `cu_seqlens`) never leak state across
  sequence boundaries.
- MLP and experts: non-gated squared ReLU. MoE through am-moe: sigmoid
  router scores, `e_score_correction_bias` (kept fp32) used only to choose
  experts, group-limited top-k, normalized weights times
  `routed_scaling_factor`, one relu2 shared expert, optional latent
  projection (`moe_latent_size`). Router logits are computed in fp32 (as
  transformers does) unless `BackendConfig.gate_precision` says otherwise.
- Untied LM head; the loss is next-token cross-entropy computed in fp32.
- Generation: `NemotronHybridCache` (KV buffers + Mamba conv/SSM state), one
  new token processed per decoding step.
- Optional multi-token prediction heads (see `mtp.py`), held as `self.mtp`
  and pinned to the last pipeline stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from am_dtype.backend import BackendConfig, initialize_linear_module
from am_dtype.cast import enforce_strict_fp32
from am_dtype.dtypes import config_dtype, resolve_dtype
from am_dtype.fp8 import fp8_autocast_forward
from am_models_nemotron.backbone import NemotronV3Model, _first_device
from am_models_nemotron.cache import NemotronHybridCache
from am_models_nemotron.config import nemotron_config
from am_models_nemotron.generation import NemotronHGenerationMixin
from am_models_nemotron.inputs import causal_lm_kwargs, check_logits_to_keep, split_positional
from am_models_nemotron.layers import init_block_weights, init_linear
from am_models_nemotron.moe_config import nemotron_moe_config, resolve_moe_config
from am_models_nemotron.mtp import MTPConfig, NemotronMTP, mtp_loss
from am_models_nemotron.outputs import (
    NemotronHCausalLMOutputWithPast,
    empty_batch_loss,
    main_loss,
    select_hidden_states,
    want_hidden_states,
)
from am_models_nemotron.pipeline import NemotronHPipelineMixin
from am_models_nemotron.state_dict_adapter import NemotronHStateDictAdapter
from am_moe.activation_checkpointing import checkpoint_blocks, is_checkpointed, uncheckpoint_blocks
from am_moe.fsdp_mixin import MoEFSDPSyncMixin
from am_utils.checkpointing import HFCheckpointingMixin
from am_utils.config import generation_config_for
from am_utils.lm_head import compute_lm_head_logits

# Re-exported: these lived in this module before it was split.
__all__ = [
    "ModelClass",
    "NemotronHCausalLMOutputWithPast",
    "NemotronHForCausalLM",
    "NemotronV3Model",
    "nemotron_moe_config",
    "resolve_moe_config",
]


class NemotronHForCausalLM(
    HFCheckpointingMixin,
    NemotronHPipelineMixin,
    NemotronHGenerationMixin,
    nn.Module,
    MoEFSDPSyncMixin,
):
    """NemotronV3 model with language-modeling head, MTP heads and `.generate()` support.

    `generate()` goes through transformers' GenerationMixin with a
    `NemotronHybridCache`: O(1) work per decoded token for the Mamba layers
    and one new KV slot per token for the attention layers.
    """

    _is_stateful = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _checkpoint_model_types = ("nemotron_h",)  # from_pretrained rejects other config.json types
    _pp_keep_self_forward = True
    main_input_name = "input_ids"

    def __init__(
        self,
        config: Any,
        backend: BackendConfig | None = None,
        mtp_loss_scaling_factor: float = 0.1,
        num_nextn_predict_layers: int | None = None,
        mtp_use_repeated_layer: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        given_config = config
        config = nemotron_config(config, num_nextn_predict_layers)
        self.config = config
        self.backend = backend or BackendConfig()
        self.mtp_config = MTPConfig.from_hf(
            config, num_nextn_predict_layers, mtp_use_repeated_layer, mtp_loss_scaling_factor
        )
        moe_config = resolve_moe_config(
            config,
            kwargs.pop("moe_config", None),
            kwargs.pop("moe_overrides", None),
            self.mtp_config.num_layers,
        )
        if kwargs:
            raise TypeError(
                f"NemotronHForCausalLM got unexpected keyword arguments {sorted(kwargs)}"
            )
        self.model = NemotronV3Model(config, self.backend, moe_config=moe_config)
        dtype = config_dtype(config)
        self.lm_head = initialize_linear_module(
            self.backend.linear,
            config.hidden_size,
            config.vocab_size,
            bias=False,
            dtype=dtype,
            cpu_gemm=self.backend.cpu_gemm,
        )
        self.mtp = (
            NemotronMTP(config, self.mtp_config, self.backend, self.model.moe_config)
            if self.mtp_config.enabled
            else None
        )
        enforce_strict_fp32(self)
        self.output_hidden_states = bool(getattr(config, "output_hidden_states", False))
        if self.backend.enable_hf_state_dict_adapter:
            self.state_dict_adapter = NemotronHStateDictAdapter(
                config, self.model.moe_config, self.backend, dtype=dtype
            )
        # From the config as given: a plain object contributes only the token ids it carries.
        self.generation_config = generation_config_for(given_config)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Any, backend: BackendConfig | None = None, **kwargs: Any):
        """Build the model from a config; call `initialize_weights` (or load weights) next.

        The am-moe router and expert parameters are allocated uninitialized (torchtitan
        style), so the model is ready to run only once weights are initialized or loaded.
        """
        return cls(config, backend, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *model_args: Any, **kwargs: Any):
        """Load config and weights (transformers' or our on-disk layout) from a local directory.

        Parameters are built in `dtype` (alias `torch_dtype`) when given, else in the
        checkpoint config's dtype. Other keywords: see HFCheckpointingMixin.from_pretrained
        (`config`, `strict`, `device`) and this class's constructor (`backend`, MTP options).
        """
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype is not None and dtype != "auto":
            from transformers import AutoConfig

            config = kwargs.get("config") or AutoConfig.from_pretrained(
                pretrained_model_name_or_path
            )
            config.dtype = resolve_dtype(dtype, name="dtype")
            kwargs["config"] = config
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter (GenerationMixin needs it)."""
        return _first_device(self)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first parameter."""
        return next(self.parameters()).dtype

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    # ------------------------------------------------------------------ forward
    @fp8_autocast_forward  # under TE's FP8 autocast when backend.te_fp8 is set
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *mtp_embed_inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal_mask_mapping: dict[str, torch.Tensor] | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: NemotronHybridCache | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        padding_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        """Logits, optional loss (next-token CE + scaled MTP loss) and cache.

        Off-PP returns `NemotronHCausalLMOutputWithPast`. As a pipeline stage
        (see `_is_pipeline_parallel_stage`) it returns tensors: the first and
        middle stages `(hidden, *mtp_embeds)`, the last stage
        `(logits, *mtp_logits_per_depth)`; without MTP just the one tensor.

        Packed (THD) batches: `[1, T]` (or `[T]`) inputs with `cu_seqlens` or `seq_idx` in
        kwargs (`qkv_format="thd"` may be passed and is not needed); no attention or Mamba
        state crosses a sequence boundary, with every attention backend including "te". The
        MTP heads run with the same BlockInputs, and their embedding shift and loss never
        reach into another sequence or padding (see `mtp.py`); the main loss gives a
        sequence's last token no target (`causal_lm_loss` with seq_idx).

        Called as transformers' `model(input_ids, attention_mask)`, the second positional
        argument is the attention mask when MTP is off (with MTP on it must be an MTP
        embedding; see `inputs.split_positional`). `output_hidden_states` (bool, index or
        indices) overrides the config's value and returns transformers' hidden states
        (embeddings + every block, the last one normed). Unknown keyword arguments are
        warned about once and ignored; a batch with no tokens gives empty logits and a
        zero loss (`outputs.empty_batch_loss`).
        """
        mtp_embed_inputs, attention_mask = split_positional(
            self.mtp_config.num_layers,
            mtp_embed_inputs,
            attention_mask,
            input_ids,
            self.config.hidden_size,
        )
        check_logits_to_keep(logits_to_keep)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs = causal_lm_kwargs(kwargs, f"{type(self).__name__}.forward")
        if padding_mask is not None:
            kwargs["padding_mask"] = padding_mask
        pp_stage = self._is_pipeline_parallel_stage()
        hidden = want_hidden_states(output_hidden_states, self.output_hidden_states)
        states = [] if hidden and not pp_stage else None
        if use_cache and past_key_values is None and not pp_stage:
            first = inputs_embeds if inputs_embeds is not None else input_ids
            past_key_values = NemotronHybridCache.for_model(self.model, first.shape[0])
        h, inputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            causal_mask_mapping=causal_mask_mapping,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            cache_position=cache_position,
            return_block_inputs=True,
            hidden_states_out=states,
            **kwargs,
        )
        if pp_stage:
            return self._pp_stage_outputs(h, input_ids, mtp_embed_inputs, inputs)
        per_depth = self._run_mtp(h, input_ids, mtp_embed_inputs, past_key_values, labels, inputs)
        logits = compute_lm_head_logits(self.lm_head, h, logits_to_keep).logits
        return NemotronHCausalLMOutputWithPast(
            loss=self._loss(logits, labels, per_depth, inputs, num_items),
            logits=logits,
            past_key_values=past_key_values if use_cache or past_key_values is not None else None,
            hidden_states=(
                select_hidden_states(states, h, output_hidden_states)
                if states is not None
                else None
            ),
            mtp_per_depth_h=per_depth or None,
            mtp_loss_scaling_factor=self.mtp_config.loss_scaling_factor if per_depth else None,
        )

    def _loss(self, logits, labels, per_depth, inputs, num_items=None) -> torch.Tensor | None:
        """Next-token loss plus the scaled MTP loss; zero (on the graph) for a batch of no tokens.

        `num_items` (Trainer's num_items_in_batch) turns every CE into a sum over its targets
        divided by it (`causal_lm_loss`, `mtp_loss`)."""
        if labels is None:
            return None
        if logits.numel() == 0:
            if tuple(labels.shape) != tuple(logits.shape[:-1]):
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} does not match logits "
                    f"{tuple(logits.shape[:-1])}"
                )
            return empty_batch_loss(logits, per_depth)
        seq_idx = inputs.seq_idx if inputs is not None else None
        loss = main_loss(logits, labels, seq_idx, num_items)
        if per_depth:
            loss = loss + mtp_loss(
                per_depth,
                labels,
                self.lm_head,
                self.mtp_config.loss_scaling_factor,
                inputs,
                num_items,
            )
        return loss

    def _run_mtp(self, h, input_ids, embeds, cache, labels, inputs) -> list[torch.Tensor]:
        """Per-depth MTP hidden states, run with the main decoder's BlockInputs `inputs`.

        Passed-in `embeds` (mtp_embed_inputs) are used as given: their shift must already
        respect packing, as `_build_mtp_embed_inputs_for_pp` does.
        """
        if self.mtp is None or cache is not None:
            return []
        if not embeds:
            if input_ids is None:
                if labels is not None:
                    raise ValueError("the MTP loss needs input_ids (or mtp_embed_inputs)")
                return []
            embeds = self._build_mtp_embed_inputs_for_pp(input_ids, inputs)
        return self.mtp(h, tuple(embeds), inputs)

    # ------------------------------------------------------------------ training utilities
    def _block_containers(self) -> list[nn.ModuleDict]:
        """The decoder blocks and the MTP sub-layers (the activation-checkpointing units)."""
        out = [self.model.layers] if self.model.layers is not None else []
        return out + ([self.mtp.layers] if self.mtp is not None else [])

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None) -> None:
        """Wrap every block (and MTP sub-layer) in a non-reentrant checkpoint wrapper. Idempotent."""
        for container in self._block_containers():
            checkpoint_blocks(container)

    def gradient_checkpointing_disable(self) -> None:
        """Unwrap blocks wrapped by gradient_checkpointing_enable."""
        for container in self._block_containers():
            uncheckpoint_blocks(container)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(
            is_checkpointed(block)
            for container in self._block_containers()
            for block in container.values()
        )

    @torch.no_grad()
    def initialize_weights(
        self, buffer_device: torch.device | None = None, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        """Sample every weight in fp32, then cast to `dtype` (e_score_correction_bias stays fp32).

        PP-aware: parts a pipeline split set to None (embed_tokens, norm,
        lm_head, mtp) are skipped.
        """
        from am_dtype.cast import yield_fp32_model

        with yield_fp32_model(self, restore_dtype=dtype):
            self.model.initialize_weights(buffer_device=buffer_device)
            with torch.device(buffer_device or self.device):
                if self.lm_head is not None:
                    init_linear(self.lm_head, self.config.initializer_range)
                if self.mtp is not None:
                    for layer in self.mtp.layers.values():
                        init_block_weights(layer, self.config, buffer_device)


ModelClass = NemotronHForCausalLM
