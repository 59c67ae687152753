"""Gemma 4 (MoE on am-moe grouped experts, dense with K/V sharing, vision), exact against transformers."""

from am_models_gemma4.attention import Gemma4Attention
from am_models_gemma4.kv_sharing import (
    _FSDPSafeSharedKVStates,
    _Gemma4KVShareHolder,
    _kv_sharing_active,
)
from am_models_gemma4.layers import Gemma4MoEDecoderLayer, Gemma4MoETextModelBackend
from am_models_gemma4.masks import (
    _build_packed_gemma4_causal_mask_mapping,
    _convert_bool_4d_mask_to_additive,
    _derive_padding_mask,
)
from am_models_gemma4.model import (
    Gemma4ForConditionalGeneration,
    Gemma4MoEModel,
    ModelCapabilities,
    ModelClass,
)
from am_models_gemma4.moe import Gemma4Gate, Gemma4MoE, gemma4_moe_config
from am_models_gemma4.state_dict_adapter import Gemma4StateDictAdapter

__all__ = [
    "Gemma4Attention",
    "Gemma4ForConditionalGeneration",
    "Gemma4Gate",
    "Gemma4MoE",
    "Gemma4MoEDecoderLayer",
    "Gemma4MoEModel",
    "Gemma4MoETextModelBackend",
    "Gemma4StateDictAdapter",
    "ModelCapabilities",
    "ModelClass",
    "_FSDPSafeSharedKVStates",
    "_build_packed_gemma4_causal_mask_mapping",
    "_Gemma4KVShareHolder",
    "_convert_bool_4d_mask_to_additive",
    "_derive_padding_mask",
    "_kv_sharing_active",
    "gemma4_moe_config",
]
