"""Spawned-rank bodies for tests/test_pp_nemotron.py (am-pp x am-models-nemotron)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import NemotronHConfig

os.environ.setdefault("AM_DTYPE_COMPILE_RMSNORM", "0")

IGNORE_INDEX = -100
DEPTHS = 2
MTP_FACTOR = 0.5  # large enough that the MTP path's share of every gradient is visible


def tiny_mtp_model(device: str | None = None):
    """Tiny hybrid Nemotron-H (Mamba, MoE, attention, MLP blocks) with 2 MTP depths."""
    from am_dtype.backend import BackendConfig
    from am_models_nemotron import NemotronHForCausalLM

    cfg = NemotronHConfig(
        vocab_size=64,
        hidden_size=32,
        layers_block_type=[
            "linear_attention",
            "moe",
            "full_attention",
            "mlp",
            "linear_attention",
            "moe",
        ],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        chunk_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        dtype="float32",
        num_nextn_predict_layers=DEPTHS,
        mtp_layers_block_type=["full_attention", "moe"],
    )
    backend = BackendConfig(attn="sdpa", linear="torch", rms_norm="torch_fp32", experts="torch")
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return NemotronHForCausalLM(cfg, backend=backend, mtp_loss_scaling_factor=MTP_FACTOR)
    model = NemotronHForCausalLM(cfg, backend=backend, mtp_loss_scaling_factor=MTP_FACTOR)
    model.initialize_weights(dtype=torch.float32)
    return model.train()


class GlobalMTPLoss:
    """The model's documented loss as a global-batch token mean, one microbatch at a time:
    CE(logits, labels shifted by 1) + factor * mean_d CE(mtp logits_d, labels shifted by d+2),
    each CE summed over the microbatch and divided by its count over the whole batch."""

    def _target(self, labels, shift):
        return F.pad(labels[:, shift:], (0, shift), value=IGNORE_INDEX)

    def set_global_batch(self, labels):
        self.counts = [
            max(int((self._target(labels, s) != IGNORE_INDEX).sum()), 1)
            for s in range(1, DEPTHS + 2)
        ]

    def __call__(self, output, labels):
        logits, *mtp_logits = output

        def ce(lg, shift):
            return (
                F.cross_entropy(
                    lg.float().flatten(0, 1),
                    self._target(labels, shift).flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                / self.counts[shift - 1]
            )

        depth = torch.stack([ce(lg, d + 2) for d, lg in enumerate(mtp_logits)]).mean()
        return ce(logits, 1) + MTP_FACTOR * depth


def _reference(ids, labels, attention_mask):
    """One process: loss and every parameter's gradient. Unpadded, the model's own loss;
    padded, `GlobalMTPLoss` over the model's outputs (the model's own MTP loss also drops
    targets whose source is padding, which a loss given only logits and labels cannot)."""
    full = tiny_mtp_model()
    return (full, *_reference_fwd_bwd(full, ids, labels, attention_mask))


def _reference_fwd_bwd(full, ids, labels, attention_mask) -> tuple[float, dict]:
    if attention_mask is None:
        loss = full(ids, labels=labels).loss
    else:
        out = full(ids, attention_mask=attention_mask)
        loss_fn = GlobalMTPLoss()
        loss_fn.set_global_batch(labels)
        loss = loss_fn((out.logits, *[full.lm_head(h) for h in out.mtp_per_depth_h]), labels)
    loss.backward()
    return float(loss), {n: p.grad for n, p in full.named_parameters()}


def _shared_references(rank: int, world_size: int, ids, labels, mask) -> dict:
    """Both references (unpadded, padded) for every rank: rank 0 computes the first while the
    last rank computes the second, then each is broadcast (ranks share two cores: two
    one-process runs instead of one per rank and reference). Every rank builds the same seeded
    model, whose weights the pipelines load."""
    import torch.distributed as dist

    out = {}
    for padded, src in ((False, 0), (True, world_size - 1)):
        full = tiny_mtp_model()
        box = (
            [_reference_fwd_bwd(full, ids, labels, mask if padded else None)]
            if rank == src
            else [None]
        )
        out[padded] = (full, box)
    for padded, src in ((False, 0), (True, world_size - 1)):
        full, box = out[padded]
        dist.broadcast_object_list(box, src=src)
        out[padded] = (full, *box[0])
    return out


def run(
    rank: int, world_size: int, ids, labels, cases: list[tuple[str, int]], attention_mask=None,
    pp_group=None, reference=None,
) -> list[dict]:  # fmt: skip
    """Each case (schedule, microbatches) on the batch, with `attention_mask` when given."""
    from am_pp import pipeline_model

    full, ref_loss, ref_grads = reference or _reference(ids, labels, attention_mask)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    results = []
    for schedule, n_microbatches in cases:
        pp = pipeline_model(
            tiny_mtp_model("meta"),
            pp_group,
            schedule,
            n_microbatches,
            loss_fn=GlobalMTPLoss(),
            state_dict=full.state_dict(),
            microbatch_size=ids.shape[0] // n_microbatches,
            seq_len=ids.shape[1],
        )
        loss = pp.step(ids, labels, **kwargs)
        errors = {}
        for name, p in pp.named_parameters():
            ref = ref_grads[name]
            got = p.grad if p.grad is not None else torch.zeros_like(ref)
            errors[name] = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
        results.append(
            {
                "stage_indices": pp.stage_indices,
                "stage_modules": [
                    sorted(n for n, m in s.named_children() if m is not None) for s in pp.stages
                ],
                "has_mtp": [s.mtp is not None for s in pp.stages],
                "loss": None if loss is None else float(loss),
                "ref_loss": ref_loss,
                "grad_errors": errors,
                "n_params": len(ref_grads),
            }
        )
    return results


def run_plan(rank, world_size, ids, labels, mask, plan) -> dict:
    """Several pipelines in one spawn (starting a rank costs more than its cases): for each
    (ranks, cases, padded) of `plan` the ranks listed run the cases over their own process
    group, with `mask` when padded (groups of different ranks at the same time). Also the
    padded batch's reference loss with an all-ones mask (to show the padding matters)."""
    import torch.distributed as dist

    groups = [dist.new_group(ranks) for ranks, _, _ in plan]  # every rank creates every group
    references = _shared_references(rank, world_size, ids, labels, mask)
    out = []
    for (ranks, cases, padded), group in zip(plan, groups, strict=True):
        if rank not in ranks:
            out.append(None)
            continue
        m = mask if padded else None
        out.append(run(rank, world_size, ids, labels, cases, m, group, references[padded]))
    unmasked = _reference(ids, labels, torch.ones_like(mask))[1] if rank == 0 else None
    return {"results": out, "padded_labels_unmasked_loss": unmasked}
