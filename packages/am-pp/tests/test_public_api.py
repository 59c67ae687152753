"""The public names of am-pp (the seed page's hf_utils names keep their module)."""

import am_pp
from am_pp import hf_utils


def test_public_api():
    assert sorted(am_pp.__all__) == sorted(
        [
            "MULTIMODAL_SUFFIXES",
            "SCHEDULES",
            "TEXT_MODULE_ATTRS",
            "PipelineCausalLMLoss",
            "PipelinedModel",
            "generate_stage_module_names",
            "get_schedule_spec",
            "get_text_module",
            "init_hf_model_buffers",
            "materialize_stage",
            "model_keeps_self_forward",
            "model_layout",
            "patch_hf_model_for_pp",
            "pipeline_model",
            "register_pp_forwards",
            "split_model_into_stages",
            "stage_indices_for_rank",
            "validate_hf_model_for_pipeline_support",
        ]
    )
    for name in am_pp.__all__:
        assert getattr(am_pp, name) is not None


def test_seed_page_names_live_in_hf_utils():
    seed = [
        "_build_or_reuse_pp_causal_mask",
        "_is_gemma4_vlm",
        "_is_mistral3_vlm",
        "_is_vlm",
        "create_pipeline_forward_causal_lm",
        "create_pipeline_forward_gemma4_text",
        "create_pipeline_forward_gemma4_vlm",
        "create_pipeline_forward_inner",
        "create_pipeline_forward_mistral3_vlm",
        "get_text_module",
        "init_hf_model_buffers",
        "model_keeps_self_forward",
        "patch_hf_model_for_pp",
        "validate_hf_model_for_pipeline_support",
        "MULTIMODAL_SUFFIXES",
        "TEXT_MODULE_ATTRS",
        "_PP_VLM_MODEL_TYPES_WITH_DEDICATED_FORWARD",
        "logger",
    ]
    missing = [n for n in seed if not hasattr(hf_utils, n)]
    assert not missing, missing
