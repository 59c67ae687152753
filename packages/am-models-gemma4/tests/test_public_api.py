"""The package's public names are pinned."""

import am_models_gemma4

EXPECTED = [
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


def test_all_is_pinned_and_importable():
    assert sorted(am_models_gemma4.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(am_models_gemma4, name) is not None
    assert am_models_gemma4.ModelClass is am_models_gemma4.Gemma4ForConditionalGeneration
