"""Spawned-rank bodies for the pipeline-parallel test (module level so spawn can import them)."""

from __future__ import annotations

import copy
import functools
import os

import torch
import torch.nn.functional as F
from _nemotron_helpers import cpu_backend, rel_err, tiny_config

os.environ.setdefault("AM_DTYPE_COMPILE_RMSNORM", "0")

IGNORE_INDEX = -100
DEPTHS = 2
MTP_FACTOR = 0.5  # large enough that the MTP path's share of every gradient is visible
CUT = 3  # stage 0: embed_tokens + layers 0-2; stage 1: layers 3-5, norm, lm_head (+ mtp)


def tiny_mtp_model():
    """The same tiny hybrid model (Mamba, MoE, attention, MLP blocks; 2 MTP depths) on every rank."""
    from am_models_nemotron import NemotronHForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(
        num_nextn_predict_layers=DEPTHS, mtp_layers_block_type=["full_attention", "moe"]
    )
    model = NemotronHForCausalLM(cfg, backend=cpu_backend(), mtp_loss_scaling_factor=MTP_FACTOR)
    model.initialize_weights(dtype=torch.float32)
    return model.train()


def default_stage_module_names(model, cut: int) -> list[list[str]]:
    """What a generic splitter produces: embed_tokens first, norm / lm_head last, no `mtp`."""
    n = len(model.model.layers)
    return [
        ["model.embed_tokens", *(f"model.layers.{i}" for i in range(cut))],
        [*(f"model.layers.{i}" for i in range(cut, n)), "model.norm", "lm_head"],
    ]


def build_stage(model, names: list[str]):
    """A copy of `model` trimmed to the modules in `names`, the way a PP splitter trims it:
    layers removed (the others keep their names, so parameter names match the full model),
    embed_tokens / norm / lm_head / mtp set to None where not kept."""
    stage = copy.deepcopy(model)
    keep = set(names)
    for idx in list(stage.model.layers):
        if f"model.layers.{idx}" not in keep:
            del stage.model.layers[idx]
    if "model.embed_tokens" not in keep:
        stage.model.embed_tokens = None
    if "model.norm" not in keep:
        stage.model.norm = None
    if "lm_head" not in keep:
        stage.lm_head = None
    if "mtp" not in keep:
        stage.mtp = None
    return stage


def pipeline_loss(output, target, factor: float) -> torch.Tensor:
    """The model's documented loss from the last stage's outputs (logits, *mtp_logits_per_depth):
    next-token CE (position t predicts labels[t + 1]) + factor * mean over depths d of the CE
    against labels shifted left by d + 2; -100 and positions past the end are ignored."""
    logits, *mtp_logits = output
    vocab = logits.shape[-1]

    def ce(lg, shift):
        shifted = F.pad(target[:, shift:], (0, shift), value=IGNORE_INDEX)
        return F.cross_entropy(
            lg.float().reshape(-1, vocab), shifted.reshape(-1), ignore_index=IGNORE_INDEX
        )

    depth_losses = [ce(lg, d + 2) for d, lg in enumerate(mtp_logits)]
    return ce(logits, 1) + factor * torch.stack(depth_losses).mean()


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in model.named_parameters()
    }


def pp_matches_single_process(
    rank: int, world_size: int, ids: torch.Tensor, labels: torch.Tensor, n_microbatches: int
) -> dict:
    """One Schedule1F1B step (scale_grads=False) of the 2-stage model vs. the full model
    run in this process on the same microbatches."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from am_utils.loss import causal_lm_loss

    assert world_size == 2
    full = tiny_mtp_model()
    weights_checksum = sum(p.double().sum().item() for p in full.parameters())

    # ---- the pipeline: stage modules from the model's hooks
    names = full.customize_pipeline_stage_modules(
        default_stage_module_names(full, CUT), "model.layers"
    )
    assert names[-1][-1] == "mtp" and all("mtp" not in n for n in names[:-1]), names
    submod = build_stage(full, names[rank])
    assert submod._is_pipeline_parallel_stage()
    mb_size, seq = ids.shape[0] // n_microbatches, ids.shape[1]
    in_meta, out_meta = submod.get_pipeline_stage_metas(rank == 0, mb_size, seq, torch.float32)
    stage = PipelineStage(
        submod, rank, world_size, torch.device("cpu"), input_args=in_meta, output_args=out_meta
    )
    # scale_grads=False: the stages' gradients are those of the SUM of the per-microbatch
    # losses (no division by n_microbatches), so the reference below backpropagates exactly
    # that sum and compares each microbatch's loss on its own: equal by construction, with
    # nothing depending on how the schedule averages.
    schedule = Schedule1F1B(
        stage,
        n_microbatches=n_microbatches,
        loss_fn=functools.partial(pipeline_loss, factor=MTP_FACTOR),
        scale_grads=False,
    )
    losses: list[torch.Tensor] = []
    if rank == 0:
        schedule.step(ids, target=labels, losses=losses)
    else:
        schedule.step(target=labels, losses=losses)
    pp_grads = {n: p.grad for n, p in submod.named_parameters()}

    # ---- the reference: the unsplit model, one forward per microbatch, on this rank
    embed = full.model.embed_tokens.weight
    ref_losses, embed_grad_main_only = [], torch.zeros_like(embed)
    for mb_ids, mb_labels in zip(
        ids.chunk(n_microbatches), labels.chunk(n_microbatches), strict=True
    ):
        out = full(mb_ids, labels=mb_labels)
        main = causal_lm_loss(out.logits, mb_labels)
        (g,) = torch.autograd.grad(main, embed, retain_graph=True)
        embed_grad_main_only += g
        out.loss.backward()
        ref_losses.append(out.loss.detach())
    ref_grads = _grads(full)

    result: dict = {"rank": rank, "weights_checksum": weights_checksum, "grad_errors": {}}
    # Every parameter of this stage, compared with the same-named one of the full model (a
    # parameter the pipeline left without a gradient compares as zeros).
    for name, grad in pp_grads.items():
        got = grad if grad is not None else torch.zeros_like(ref_grads[name])
        result["grad_errors"][name] = rel_err(got, ref_grads[name])
    result["nonzero_ref_grads"] = sum(bool(ref_grads[n].abs().sum() > 0) for n in pp_grads)
    if rank == 0:
        # embed_tokens' gradient also comes through the MTP embeddings e_d, which stage 0 sends
        # to stage 1 as extra outputs: had the pipeline dropped their gradients, the error of
        # embed_tokens would be this large.
        result["embed_err_without_mtp_path"] = rel_err(
            embed_grad_main_only, ref_grads["model.embed_tokens.weight"]
        )
    else:
        result["losses"] = [float(x.detach()) for x in losses]
        result["ref_losses"] = [float(x) for x in ref_losses]
    return result
