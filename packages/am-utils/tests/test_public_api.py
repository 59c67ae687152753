"""Pins the public names of am_utils (the seed pages' names, re-exported at the top)."""

import am_utils

EXPECTED = [
    "ATTENTION_KERNELS",
    "AttentionKernel",
    "VarlenSeqs",
    "build_te_attention",
    "build_varlen_seqs",
    "IGNORE_INDEX",
    "causal_lm_loss",
    "next_token_targets",
    "build_attention_mask",
    "causal_mask",
    "seq_idx_from_cu_seqlens",
    "to_additive_mask",
    "to_bool_mask",
    "token_mask_from",
    "HFCheckpointingMixin",
    "VLM_INPUT_KEYS",
    "apply_parameter_freezing",
    "apply_rotary_pos_emb",
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

# Private helpers the seed pages list, importable from their modules.
PRIVATE = {
    "am_utils.freezing": ["_freeze_module_by_attribute_and_patterns"],
    "am_utils.params": ["_get_model_param_stats", "_get_logical_numel"],
    "am_utils.introspect": [
        "_get_forward_signature",
        "_supports_logits_to_keep",
        "_supports_seq_lens",
    ],
}


def test_all_is_pinned():
    assert sorted(am_utils.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(am_utils, name) is not None


def test_private_helpers_exist():
    import importlib

    for module_name, names in PRIVATE.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert callable(getattr(module, name)), f"{module_name}.{name}"


def test_no_sibling_imports():
    """am-utils depends on torch/transformers/safetensors and am-dtype (one copy of the dtype
    names and DTensor helpers), never on another sibling package."""
    from pathlib import Path

    for path in Path(am_utils.__file__).parent.glob("*.py"):
        text = path.read_text()
        for sibling in ("am_moe", "am_pp", "am_models_", "am_automodel"):
            assert f"import {sibling}" not in text and f"from {sibling}" not in text, path
