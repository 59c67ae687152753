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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from am_dtype.backend import BackendConfig, initialize_linear_module
from am_dtype.backend import initialize_rms_norm_module as _rms_norm
from am_dtype.cast import enforce_strict_fp32
from am_dtype.dtypes import config_dtype, resolve_dtype
from am_dtype.fp8 import fp8_autocast_forward
from am_models_nemotron.cache import NemotronHybridCache
from am_models_nemotron.config import nemotron_config, uses_moe
from am_models_nemotron.inputs import (
    causal_lm_kwargs,
    check_logits_to_keep,
    check_model_inputs,
    split_positional,
)
from am_models_nemotron.layers import (
    BlockInputs,
    NemotronBlock,
    init_block_weights,
    init_linear,
    init_norm,
    resolve_block_types,
)
from am_models_nemotron.mtp import MTPConfig, NemotronMTP, mtp_embed_inputs, mtp_loss
from am_models_nemotron.outputs import empty_batch_loss, select_hidden_states, want_hidden_states
from am_models_nemotron.state_dict_adapter import NemotronHStateDictAdapter
from am_moe.activation_checkpointing import checkpoint_blocks, is_checkpointed, uncheckpoint_blocks
from am_moe.config import MoEConfig
from am_moe.fsdp_mixin import MoEFSDPSyncMixin
from am_utils.attention import build_varlen_seqs
from am_utils.checkpointing import HFCheckpointingMixin
from am_utils.config import generation_config_for
from am_utils.lm_head import compute_lm_head_logits
from am_utils.loss import IGNORE_INDEX, causal_lm_loss, next_token_targets
from am_utils.masks import (
    build_attention_mask,
    causal_mask,
    seq_idx_from_cu_seqlens,
    to_additive_mask,
    token_mask_from,
)
from am_utils.validation import check_generate_inputs


@dataclass
class NemotronHCausalLMOutputWithPast(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus declared MTP fields.

    Declared (not set dynamically) so they survive layers that rebuild
    ModelOutput instances from their declared fields, such as FSDP2's
    mixed-precision output cast.
    """

    mtp_per_depth_h: list[torch.Tensor] | None = None
    mtp_loss_scaling_factor: float | None = None


def nemotron_moe_config(config: Any, overrides: dict | None = None) -> MoEConfig:
    """The MoEConfig of a Nemotron-H config (sigmoid + correction bias, relu2, one shared expert)."""
    values = dict(
        n_routed_experts=config.n_routed_experts,
        n_shared_experts=1,
        n_activated_experts=config.num_experts_per_tok,
        n_expert_groups=config.n_group,
        n_limited_groups=config.topk_group,
        train_gate=True,  # the router weight is trained, as in transformers
        gate_bias_update_factor=0.0,
        aux_loss_coeff=0.0,
        score_func="sigmoid",
        route_scale=config.routed_scaling_factor,
        dim=config.hidden_size,
        inter_dim=config.intermediate_size,
        moe_inter_dim=config.moe_intermediate_size,
        norm_topk_prob=config.norm_topk_prob,
        router_bias=False,
        expert_bias=config.mlp_bias,
        expert_activation="relu2",
        dtype=config_dtype(config),
        shared_expert_gate=False,
        shared_expert_inter_dim=config.moe_shared_expert_intermediate_size,
        shared_expert_activation="relu2",
        force_e_score_correction_bias=True,
        moe_latent_size=getattr(config, "moe_latent_size", None),
    )
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise ValueError(
            f"moe_overrides has unknown keys {sorted(unknown)}; accepted: {sorted(values)}"
        )
    values.update(overrides or {})
    return MoEConfig(**values)


def resolve_moe_config(
    config: Any,
    moe_config: MoEConfig | None = None,
    overrides: dict | None = None,
    mtp_layers: int = 0,
) -> MoEConfig | None:
    """The MoEConfig to build with: `moe_config` when given, else `nemotron_moe_config` when
    a decoder (or, with `mtp_layers`, MTP) block is MoE, else None: a dense checkpoint
    (Nemotron-H 8B, Nano 9B v2) needs no expert fields in its config."""
    if moe_config is not None:
        if overrides:
            raise ValueError(
                "moe_overrides cannot be combined with an explicit moe_config; put the "
                "values in the MoEConfig"
            )
        return moe_config
    if uses_moe(config, mtp_layers):
        return nemotron_moe_config(config, overrides)
    if overrides:
        raise ValueError(
            f"moe_overrides {sorted(overrides)} given, but the config has no moe blocks "
            "(a dense Nemotron-H has no MoE to configure)"
        )
    return None


class NemotronV3Model(nn.Module):
    """NemotronV3 base model (without LM head): embeddings, hybrid blocks, final norm."""

    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def __init__(
        self,
        config: Any,
        backend: BackendConfig | None = None,
        moe_config: MoEConfig | None = None,
        moe_overrides: dict | None = None,
    ):
        super().__init__()
        config = nemotron_config(config)
        self.config = config
        self.backend = backend or BackendConfig()
        self.moe_config = resolve_moe_config(config, moe_config, moe_overrides)
        dtype = config_dtype(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleDict(
            {
                str(i): NemotronBlock(config, i, block_type, self.backend, self.moe_config)
                for i, block_type in enumerate(resolve_block_types(config))
            }
        )
        self.norm = _rms_norm(
            self.backend.rms_norm, config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype
        )
        enforce_strict_fp32(self)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        causal_mask_mapping: dict[str, torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: NemotronHybridCache | None = None,
        cache_position: torch.LongTensor | None = None,
        return_block_inputs: bool = False,
        hidden_states_out: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, BlockInputs]:
        """Hidden states [B, S, H] (or [T, H] for a THD input), normed on the last stage.

        Pipeline stages: with `embed_tokens` None, `input_ids` carries the
        upstream hidden states; with `norm` None the final norm is skipped.
        kwargs: `padding_mask` [B, S] (True = padding), `seq_idx` [B, S] or `cu_seqlens` for
        packed sequences; others (`qkv_format`, `max_seqlen`, ...) are accepted and ignored.
        With attn='te' packing and padding reach attention as THD sequence boundaries
        (`build_varlen_seqs`), with the other kernels as a dense mask (`build_attention_mask`).
        `return_block_inputs=True` also returns the BlockInputs the blocks ran with ([B, S]
        form), so the MTP heads reuse the same packing / padding without rebuilding it.
        `hidden_states_out`, when a list, receives the embeddings output and each block's
        output (transformers' hidden states before the final norm), shaped like the result.
        Inputs are checked first (`inputs.check_model_inputs`).
        """
        check_model_inputs(self, input_ids, inputs_embeds, attention_mask, past_key_values, kwargs)
        h = self._embed_or_pass_through(input_ids, inputs_embeds)
        thd = h.dim() == 2
        if thd:
            h = h.unsqueeze(0)
        inputs = self._block_inputs(h, attention_mask, causal_mask_mapping, past_key_values, kwargs)
        collect = hidden_states_out.append if hidden_states_out is not None else None
        if collect:
            collect(h.squeeze(0) if thd else h)
        for block in self.layers.values():
            h = block(h, inputs)
            if collect:
                collect(h.squeeze(0) if thd else h)
        if past_key_values is not None:
            past_key_values.advance(h.shape[1])
        if self.norm is not None:
            h = self.norm(h)
        h = h.squeeze(0) if thd else h
        return (h, inputs) if return_block_inputs else h

    def _embed_or_pass_through(self, input_ids, inputs_embeds) -> torch.Tensor:
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids is None:
            raise ValueError("NemotronV3Model.forward needs input_ids or inputs_embeds")
        if self.embed_tokens is None:
            if input_ids.is_floating_point():
                return input_ids
            raise ValueError(
                "this pipeline stage has no embed_tokens: input_ids must be the upstream "
                f"hidden states (floating point), got dtype {input_ids.dtype}"
            )
        return self.embed_tokens(input_ids)

    def _block_inputs(self, h, attention_mask, causal_mask_mapping, cache, kwargs) -> BlockInputs:
        token_mask = token_mask_from(attention_mask, kwargs.get("padding_mask"))
        attn_mask = (causal_mask_mapping or {}).get("full_attention")
        if attn_mask is None and attention_mask is not None and attention_mask.dim() == 4:
            attn_mask = attention_mask
        seq_idx = kwargs.get("seq_idx")
        if seq_idx is None and kwargs.get("cu_seqlens") is not None:
            seq_idx = seq_idx_from_cu_seqlens(kwargs["cu_seqlens"], h.shape[1]).to(h.device)
        if seq_idx is not None and seq_idx.dim() == 1:
            seq_idx = seq_idx.unsqueeze(0)
        q_len = h.shape[1]
        kv_len = q_len + (cache.get_seq_length() if cache is not None else 0)
        current = token_mask[:, -q_len:] if token_mask is not None else None
        if self.backend.attn == "te":
            # Boundaries, not a [B, 1, Q, K] mask; cu_seqlens is taken as given unless
            # seq_idx (which wins, as for the mask) was passed too.
            cu = kwargs.get("cu_seqlens") if kwargs.get("seq_idx") is None else None
            varlen = build_varlen_seqs(q_len, kv_len, h.shape[0], token_mask, seq_idx, cu)
            return BlockInputs(attn_mask, current, seq_idx, cache, varlen)
        if attn_mask is None:
            attn_mask = build_attention_mask(q_len, kv_len, token_mask, seq_idx)
        return BlockInputs(attn_mask, current, seq_idx, cache)

    @torch.no_grad()
    def initialize_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialize weights as transformers' NemotronH does; skips parts a PP split removed."""
        std = self.config.initializer_range
        with torch.device(buffer_device or _first_device(self)):
            if self.embed_tokens is not None:
                nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=std)
            if self.norm is not None:
                init_norm(self.norm)
            for block in self.layers.values():
                init_block_weights(block, self.config, buffer_device)


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class NemotronHForCausalLM(HFCheckpointingMixin, GenerationMixin, nn.Module, MoEFSDPSyncMixin):
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
            self.backend.linear, config.hidden_size, config.vocab_size, bias=False, dtype=dtype
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
        loss = _main_loss(logits, labels, seq_idx, num_items)
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

    def _pp_stage_outputs(self, h, input_ids, embeds, inputs=None):
        """A pipeline stage's output tensors (see `forward`).

        The first stage shifts the MTP embeddings with its BlockInputs, so they respect packing
        when the microbatch's `cu_seqlens` / `seq_idx` / padding mask reach it. The last stage
        runs the MTP blocks with the BlockInputs built from the kwargs it receives itself;
        torch.distributed.pipelining hands microbatch kwargs to the first stage only, so
        there a later stage sees a packed row as one sequence (its decoder blocks too), and
        the loss function, given only logits, must mask MTP targets that cross a boundary.
        """
        is_first = self.model.embed_tokens is not None
        if self.mtp_config.enabled and is_first and not embeds:
            embeds = self._build_mtp_embed_inputs_for_pp(input_ids, inputs)
        if self.lm_head is None:
            return (h, *embeds) if self.mtp_config.enabled else h
        logits = self.lm_head(h)
        if self.mtp is None:
            return logits
        return (logits, *[self.lm_head(hd) for hd in self.mtp(h, tuple(embeds), inputs)])

    def _build_mtp_embed_inputs_for_pp(
        self, input_ids: torch.Tensor, inputs: BlockInputs | None = None
    ) -> tuple[torch.Tensor, ...]:
        """For each MTP depth d = 1..D, the embeddings of `input_ids` shifted left by d, the
        vacated tail filled with token id 0; built where embed_tokens lives.

        Returns a tuple of `num_nextn_predict_layers` tensors [B, S, H]; under
        PP they travel with the hidden states through every stage. `inputs` (the
        BlockInputs of this forward) also fill with token 0 the shifts that would cross a
        packed-sequence boundary or reach padding; None treats each row as one sequence.
        """
        if self.model.embed_tokens is None:
            raise ValueError("_build_mtp_embed_inputs_for_pp needs embed_tokens (first PP stage)")
        return mtp_embed_inputs(
            self.model.embed_tokens, input_ids, self.mtp_config.num_layers, inputs
        )

    # ------------------------------------------------------------------ pipeline parallel
    def _is_pipeline_parallel_stage(self) -> bool:
        """True when a PP splitter trimmed this module (lm_head / embed_tokens None, layers removed)."""
        if hasattr(self, "lm_head") and self.lm_head is None:
            return True
        inner = getattr(self, "model", None)
        if inner is not None and hasattr(inner, "embed_tokens") and inner.embed_tokens is None:
            return True
        layers = getattr(inner, "layers", None) if inner is not None else None
        return layers is not None and len(layers) != len(resolve_block_types(self.config))

    def customize_pipeline_stage_modules(
        self,
        module_names_per_stage: list[list[str]],
        layers_prefix: str,
        text_model: nn.Module | None = None,
    ) -> list[list[str]]:
        """Pin the MTP head ("mtp") to the last stage's module list."""
        if self.mtp is None or not module_names_per_stage:
            return module_names_per_stage
        out = [list(names) for names in module_names_per_stage]
        for names in out[:-1]:
            if "mtp" in names:
                names.remove("mtp")
        if "mtp" not in out[-1]:
            out[-1].append("mtp")
        return out

    def get_pipeline_stage_metas(
        self, is_first: bool, microbatch_size: int, seq_len: int, dtype: torch.dtype
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Meta tensors of this stage's (inputs, outputs); with MTP each carries 1 + D tensors.

        The floating-point ones require grad, as the stage's real outputs do in training:
        torch.distributed.pipelining's static `PipelineStage(input_args=..., output_args=...)`
        takes `requires_grad` from them to decide which activations it receives as autograd
        leaves and which output gradients it exchanges (with plain meta tensors no gradient
        crosses a stage boundary and the first stage's backward fails). Without a backward
        (`has_backward` False or no grad mode) the stage ignores the flag.
        """
        B, S, H = microbatch_size, seq_len, self.config.hidden_size
        depth = self.mtp_config.num_layers

        def hidden(width=H):
            return torch.empty(B, S, width, dtype=dtype, device="meta", requires_grad=True)

        extra = tuple(hidden() for _ in range(depth))
        if is_first:
            inputs = (torch.empty(B, S, dtype=torch.long, device="meta"),)
        else:
            inputs = (hidden(), *extra)
        if self.lm_head is not None:
            vocab = self.config.vocab_size
            outputs = (hidden(vocab), *(hidden(vocab) for _ in range(depth)))
        else:
            outputs = (hidden(), *extra)
        return inputs, outputs

    # ------------------------------------------------------------------ generation
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


def _main_loss(logits, labels, seq_idx, num_items) -> torch.Tensor:
    """`causal_lm_loss`; with Trainer's `num_items_in_batch` the sum over targets divided by it,
    as transformers' loss does, so a window's microbatch losses add up to its token mean (and a
    microbatch without targets gives 0, not NaN)."""
    if num_items is None:
        return causal_lm_loss(logits, labels, seq_idx)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:-1])}"
        )
    target = next_token_targets(labels, seq_idx)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        target.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / num_items


ModelClass = NemotronHForCausalLM
