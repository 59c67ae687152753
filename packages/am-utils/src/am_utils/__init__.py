"""Model utilities: LM-head logits, THD squeeze, freezing, parameter counts, empty init,
HF checkpoint mixin."""

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
from am_utils.params import count_model_parameters, print_trainable_parameters
from am_utils.thd import squeeze_input_for_thd

__all__ = [
    "HFCheckpointingMixin",
    "VLM_INPUT_KEYS",
    "apply_parameter_freezing",
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
    "print_trainable_parameters",
    "resolve_trust_remote_code",
    "skip_random_init",
    "squeeze_input_for_thd",
]
