"""The package's public names are pinned."""

import am_models_nemotron

EXPECTED = [
    "BlockInputs",
    "MIXER_BUILDERS",
    "MTPConfig",
    "Mamba2Mixer",
    "MambaState",
    "ModelClass",
    "NemotronAttention",
    "NemotronBlock",
    "NemotronHCausalLMOutputWithPast",
    "NemotronHForCausalLM",
    "NemotronHStateDictAdapter",
    "NemotronHybridCache",
    "NemotronMLP",
    "NemotronMTP",
    "NemotronV3Model",
    "nemotron_moe_config",
    "resolve_block_types",
]


def test_all_is_pinned_and_importable():
    assert sorted(am_models_nemotron.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(am_models_nemotron, name) is not None


def test_seed_page_contract():
    from am_models_nemotron import model

    cls = model.NemotronHForCausalLM
    assert model.ModelClass is cls
    assert cls._keep_in_fp32_modules_strict == ["e_score_correction_bias"]
    assert model.NemotronV3Model._keep_in_fp32_modules_strict == ["e_score_correction_bias"]
    assert cls._is_stateful and cls._pp_keep_self_forward and cls.main_input_name == "input_ids"
    fields = model.NemotronHCausalLMOutputWithPast.__dataclass_fields__
    assert {"mtp_per_depth_h", "mtp_loss_scaling_factor", "logits", "loss"} <= set(fields)
    for name in (
        "from_config",
        "from_pretrained",
        "save_pretrained",
        "generate",
        "prepare_inputs_for_generation",
        "_make_causal_mask",
        "gradient_checkpointing_enable",
        "gradient_checkpointing_disable",
        "initialize_weights",
        "customize_pipeline_stage_modules",
        "get_pipeline_stage_metas",
        "_build_mtp_embed_inputs_for_pp",
        "_is_pipeline_parallel_stage",
    ):
        assert callable(getattr(cls, name)), name
