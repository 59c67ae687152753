"""Pipeline parallelism for Hugging Face models on torch.distributed.pipelining.

`hf_utils`: pipeline-aware forwards and model checks; `split`: stage module lists and stage
copies; `schedule`: PipelineStages, torch schedules by name, the global-batch loss."""

from am_pp.hf_utils import (
    MULTIMODAL_SUFFIXES,
    TEXT_MODULE_ATTRS,
    get_text_module,
    init_hf_model_buffers,
    model_keeps_self_forward,
    patch_hf_model_for_pp,
    register_pp_forwards,
    validate_hf_model_for_pipeline_support,
)
from am_pp.schedule import (
    SCHEDULES,
    PipelineCausalLMLoss,
    PipelinedModel,
    get_schedule_spec,
    pipeline_model,
    stage_indices_for_rank,
)
from am_pp.split import (
    generate_stage_module_names,
    materialize_stage,
    model_layout,
    split_model_into_stages,
)

__all__ = [
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
