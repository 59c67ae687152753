"""Build the model for this rank: on the meta device, parallelized, then materialized.

The model is constructed with its parameters on the meta device (no memory), parallelized (EP + FSDP2 +
activation checkpointing through `am_moe.parallelize_model`), moved to the device with
`to_empty` (each rank allocates only its shards), and filled from one full set of starting
weights that rank 0 alone builds on CPU (the checkpoint's, or a seeded fresh init) and
broadcasts. Every rank count thus starts from the very same weights as one process. With
context parallelism the FSDP2 root is the `ContextParallelRoot` around the model (see
`am_automodel.cp`), sharded over the data axes and `cp`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from am_automodel.cp import ContextParallelRoot
from am_automodel.mesh import MeshPlan
from am_automodel.models import initial_state_dict
from am_automodel.recipe import Recipe, RecipeError

__all__ = ["build_model"]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """The model's own activation checkpointing (`gradient_checkpointing_enable()`)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise RecipeError(
            f"parallelism.activation_checkpointing: {type(model).__name__} has no "
            "gradient_checkpointing_enable()"
        )
    model.gradient_checkpointing_enable()


def build_model(
    recipe: Recipe, config, spec, backend, plan: MeshPlan, mesh, rank: int
) -> tuple[nn.Module, ContextParallelRoot | None]:
    """The training model of this rank, with the starting weights loaded, and with
    `parallelism.cp > 1` the `ContextParallelRoot` that runs it (the FSDP2 root under FSDP)."""
    from am_utils import init_empty_weights

    # Parameters on the meta device; buffers (RoPE frequencies, embedding scales, often not
    # in the state dict) are computed for real, kept through to_empty below.
    with init_empty_weights():
        model = spec.build(config, backend)
    cp_root = ContextParallelRoot(model, mesh["cp"]) if plan.cp > 1 else None
    par = recipe.parallelism
    if plan.use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from am_moe.parallelizer import parallelize_model

        mp = None
        if par.mixed_precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        parallelize_model(
            model if cp_root is None else cp_root,
            mesh,
            dp_axis_names=plan.fsdp_axes,
            dp_replicate_axis_name="dp_replicate",  # HSDP: replicas, each sharded over dp_shard
            ep_axis_name="ep",
            mp_policy=mp,
            activation_checkpointing=par.activation_checkpointing,
        )
    elif par.activation_checkpointing:
        enable_activation_checkpointing(model)
    device = (
        torch.device(plan.device, torch.cuda.current_device())
        if plan.device == "cuda"
        else torch.device("cpu")
    )
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)
    # to_empty gives every module its own new parameter, so a tied lm_head would train apart
    # from the embedding (and the export, which writes the tied weight once, would differ).
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    full = initial_state_dict(recipe.model, config, backend, recipe.train.seed) if rank == 0 else {}
    set_model_state_dict(
        model,
        full,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=plan.world_size > 1),
    )
    return model.train(), cp_root
