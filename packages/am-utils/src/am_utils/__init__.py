"""Model utilities: attention kernels and masks, causal-LM loss, LM-head logits, THD squeeze,
freezing, parameter counts, empty init, HF checkpoint mixin."""

from am_utils.attention import (
    ATTENTION_KERNELS,
    AttentionKernel,
    VarlenSeqs,
    build_te_attention,
    build_varlen_seqs,
)
from am_utils.checkpointing import HFCheckpointingMixin
from am_utils.freezing import (
    apply_parameter_freezing,
    freeze_deepseek_v4_indexer_params,
    freeze_minimax_m3_indexer_params,
    freeze_unused_kv_sharing_params,
)
from am_utils.init import init_empty_weights, skip_random_init
from am_utils.introspect import (
    VLM_INPUT_KEYS,
    enable_radio_vit_fused_attn,
    filter_forward_kwargs,
    get_lm_head_module,
    get_lm_head_weight,
    resolve_trust_remote_code,
)
from am_utils.lm_head import compute_lm_head_logits, get_rope_config
from am_utils.loss import IGNORE_INDEX, causal_lm_loss, next_token_targets
from am_utils.masks import (
    build_attention_mask,
    causal_mask,
    seq_idx_from_cu_seqlens,
    to_additive_mask,
    to_bool_mask,
    token_mask_from,
)
from am_utils.params import count_model_parameters, print_trainable_parameters
from am_utils.rope import apply_rotary_pos_emb
from am_utils.thd import squeeze_input_for_thd

__all__ = [
    "ATTENTION_KERNELS",
    "AttentionKernel",
    "HFCheckpointingMixin",
    "IGNORE_INDEX",
    "VLM_INPUT_KEYS",
    "VarlenSeqs",
    "apply_parameter_freezing",
    "apply_rotary_pos_emb",
    "build_attention_mask",
    "build_te_attention",
    "build_varlen_seqs",
    "causal_lm_loss",
    "causal_mask",
    "compute_lm_head_logits",
    "count_model_parameters",
    "enable_radio_vit_fused_attn",
    "filter_forward_kwargs",
    "freeze_deepseek_v4_indexer_params",
    "freeze_minimax_m3_indexer_params",
    "freeze_unused_kv_sharing_params",
    "get_lm_head_module",
    "get_lm_head_weight",
    "get_rope_config",
    "init_empty_weights",
    "next_token_targets",
    "print_trainable_parameters",
    "resolve_trust_remote_code",
    "seq_idx_from_cu_seqlens",
    "skip_random_init",
    "squeeze_input_for_thd",
    "to_additive_mask",
    "to_bool_mask",
    "token_mask_from",
]
