"""Spawned-rank bodies for the am-pp distributed tests (module level so spawn imports them).

The first rank of each pipeline computes the reference (the unsplit transformers model, one
process, whole global batch, token-mean CE) and broadcasts its loss and gradients to the
others (ranks share two cores: one reference per pipeline instead of one per rank); every
rank builds the same seeded model for its weights, runs the pipeline and compares its own
stages' gradients with the reference's same-named parameters; the last stage's rank also
compares the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _pp_models import CASES, IGNORE_INDEX, SEQ, batch

from am_pp.schedule import pipeline_model
from am_pp.split import model_layout


def packed_position_ids(batch_size: int) -> torch.Tensor:
    """Every row holds two packed sequences (5 and SEQ - 5 tokens)."""
    row = list(range(5)) + list(range(SEQ - 5))
    return torch.tensor([row] * batch_size)


def left_padding_mask(batch_size: int) -> torch.Tensor:
    """A different left padding in every row (so in every microbatch of one row)."""
    mask = torch.ones(batch_size, SEQ, dtype=torch.long)
    for row in range(batch_size):
        mask[row, : (3 * row) % 7] = 0
    return mask


def _inputs(batch_size: int, packed: bool, padded: bool) -> dict:
    if packed:
        return {"position_ids": packed_position_ids(batch_size)}
    if padded:
        return {"attention_mask": left_padding_mask(batch_size)}
    return {}


def reference_loss_and_grads(name: str, data: dict, inputs: dict, pp_group=None):
    """The one-process reference: loss and every parameter's gradient, computed on the
    first rank of `pp_group` and broadcast to its other ranks (the model, seeded, is built
    on every rank: its weights go into the pipeline)."""
    import torch.distributed as dist

    model = CASES[name]()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        leader = dist.get_global_rank(pp_group, 0)
        box = [_reference_fwd_bwd(model, data, inputs) if dist.get_rank() == leader else None]
        dist.broadcast_object_list(box, src=leader, group=pp_group)
        return (model, *box[0])
    return (model, *_reference_fwd_bwd(model, data, inputs))


def _reference_fwd_bwd(model, data: dict, inputs: dict) -> tuple[float, dict]:
    extra = {**inputs, "use_cache": False} if inputs else {}
    logits = model(input_ids=data["input_ids"], **data["image_kwargs"], **extra).logits
    targets = F.pad(data["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def _mask_builds(pp) -> list[int]:
    return [getattr(model_layout(s).text_model, "_pp_causal_mask_builds", 0) for s in pp.stages]


def run_case(
    name: str, schedule: str, n_microbatches: int, batch_size: int, from_meta: bool,
    packed: bool = False, padded: bool = False, pp_group=None,
) -> dict:  # fmt: skip
    data = batch(name, batch_size, n_microbatches)
    inputs = _inputs(batch_size, packed, padded)
    if padded:  # padding positions are no targets
        data["labels"] = data["labels"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    ref_model, ref_loss, ref_grads = reference_loss_and_grads(name, data, inputs, pp_group)
    if from_meta:
        with torch.device("meta"):
            source = CASES[name]()
        state_dict = ref_model.state_dict()
    else:
        source, state_dict = CASES[name](), None
    pp = pipeline_model(source, pp_group, schedule, n_microbatches, state_dict=state_dict)
    step = dict(microbatch_kwargs=data["image_kwargs_mbs"], **inputs)
    loss = pp.step(data["input_ids"], data["labels"], **step)
    errors = {}
    for pname, p in pp.named_parameters():
        ref = ref_grads.get(pname)
        if ref is None:  # a parameter the reference gives no gradient must get none here either
            errors[pname] = 0.0 if p.grad is None or not p.grad.any() else float("inf")
            continue
        errors[pname] = _rel_err(p.grad if p.grad is not None else torch.zeros_like(ref), ref)
    eval_loss, builds = None, None
    if pp.placement != "v":  # torch's eval cannot run V-shaped schedules (see eval_step)
        eval_loss = pp.eval_step(data["input_ids"], data["labels"], **step)
        # Mask builds per stage of this rank in one more forward-only pass (the first
        # eval_step re-ran torch's shape inference, a forward of its own, for the mode switch).
        before = _mask_builds(pp)
        pp.eval_step(data["input_ids"], data["labels"], **step)
        builds = [b - a for a, b in zip(before, _mask_builds(pp), strict=True)]
    return {
        "stage_indices": pp.stage_indices,
        "loss": None if loss is None else float(loss),
        "eval_loss": None if eval_loss is None else float(eval_loss),
        "ref_loss": ref_loss,
        "grad_errors": errors,
        "n_ref_params": len(dict(ref_model.named_parameters())),
        "mask_builds": builds,
    }


def run_in_groups(rank: int, world_size: int, plan: list[tuple[list[int], list[tuple]]]):
    """Several pipelines in one spawn: for each (ranks, cases) of `plan`, the ranks listed
    run the cases as a pipeline over their own process group (the others skip them). Groups
    of different ranks run at the same time; one spawn costs less than the cases (each rank
    imports torch and transformers). Returns, per plan entry, this rank's results or None."""
    import torch.distributed as dist

    torch.manual_seed(1234 + rank)  # ranks must not rely on sharing RNG state
    groups = [dist.new_group(ranks) for ranks, _ in plan]  # every rank creates every group
    out = []
    for (ranks, cases), group in zip(plan, groups, strict=True):
        member = rank in ranks
        out.append([run_case(*case, pp_group=group) for case in cases] if member else None)
    return out
