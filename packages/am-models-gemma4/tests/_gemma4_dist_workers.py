"""Spawned-rank bodies for the distributed tests (module level so spawn can import them)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _gemma4_helpers import cpu_backend, rel_err
from torch.distributed.device_mesh import init_device_mesh

os.environ.setdefault("AM_DTYPE_COMPILE_RMSNORM", "0")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _reference(checkpoint: str, ids: torch.Tensor, world_size: int):
    """Loss (mean over the per-rank rows) and gradients of one unsharded process."""
    from am_models_gemma4 import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, backend=cpu_backend())
    model.train()
    rows = [ids[r : r + 1] for r in range(world_size)]
    loss = torch.stack([model(x, labels=x, use_cache=False).loss for x in rows]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(model, loss, ref_loss, ref_grads, world_size) -> dict[str, float]:
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    errors = {"loss": abs(mean.item() / world_size - ref_loss.item())}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        name = name.replace("._checkpoint_wrapped_module", "")  # am-moe AC wrappers
        errors[name] = rel_err(_full(param.grad), ref_grads[name])
    return errors


def moe_ep_fsdp_matches_single_process(rank, world_size, checkpoint, ids):
    """EP=2 (experts split over the ranks) + FSDP2 through am-moe's parallelizer, each rank
    on its own row, against one process on both rows; then EP-local loading and saving."""
    from am_models_gemma4 import Gemma4ForConditionalGeneration
    from am_moe.parallelizer import parallelize_model
    from am_utils.checkpointing import read_hf_state_dict

    ref_loss, ref_grads = _reference(checkpoint, ids, world_size)
    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp", "ep"))
    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, backend=cpu_backend())
    model.train()
    parallelize_model(model, mesh, block_container="model.language_model.layers")
    up = model.model.layers[0].moe.experts.gate_and_up_projs
    assert up.to_local().shape[0] == 8 // world_size
    loss = model(ids[rank : rank + 1], labels=ids[rank : rank + 1], use_cache=False).loss
    loss.backward()
    errors = _compare(model, loss, ref_loss, ref_grads, world_size)

    # EP-aware loading: only this rank's experts are stacked, as DTensor Shard(0) shards.
    hf = read_hf_state_dict(checkpoint)
    local = model.state_dict_adapter.from_hf(hf, device_mesh=mesh)
    key = "model.language_model.layers.1.moe.experts.gate_and_up_projs"
    first, last = rank * 4, rank * 4 + 4
    expected = hf["model.language_model.layers.1.experts.gate_up_proj"][first:last]
    assert torch.equal(local[key].to_local(), expected.transpose(1, 2))
    # Saving gathers every shard: the files equal the checkpoint we started from.
    saved = os.path.join(checkpoint, "ep_saved")
    model.save_pretrained(saved)
    written = read_hf_state_dict(saved)
    assert set(written) == set(hf), set(written) ^ set(hf)
    assert all(torch.equal(written[k], hf[k]) for k in hf)
    return errors


def dense_kv_sharing_fsdp_matches_single_process(rank, world_size, checkpoint, ids):
    """FSDP2 per decoder layer with cast_forward_inputs=True and am-moe's activation
    checkpointing (parallelize_model) on the E2B-like model: the shared layers still read
    their source layer's K/V (loss and every gradient equal one process)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from am_models_gemma4 import Gemma4ForConditionalGeneration
    from am_moe.parallelizer import parallelize_model

    ref_loss, ref_grads = _reference(checkpoint, ids, world_size)
    mesh = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("dp", "ep"))
    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, backend=cpu_backend())
    model.train()
    # param_dtype set: FSDP2 then really runs its input cast (and would copy a plain dict).
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, cast_forward_inputs=True)
    parallelize_model(
        model,
        mesh,
        mp_policy=policy,
        activation_checkpointing=True,
        block_container="model.language_model.layers",
    )
    wrapped = model.model.language_model.layers[0]
    assert hasattr(wrapped, "_checkpoint_wrapped_module")
    loss = model(ids[rank : rank + 1], labels=ids[rank : rank + 1], use_cache=False).loss
    loss.backward()
    return _compare(model, loss, ref_loss, ref_grads, world_size)


def cp_matches_single_process(rank, world_size, checkpoint, ids):
    """CP=world_size (load-balanced chunks, sequence longer than the sliding window): this
    rank's logits equal the full run's at its positions; summed loss and the gradients
    summed over ranks equal one process."""
    import torch.nn.functional as F

    from am_models_gemma4 import Gemma4ForConditionalGeneration
    from am_models_gemma4.cp import load_balanced_indices

    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, backend=cpu_backend())
    model.train()
    full = model(ids, use_cache=False).logits
    ref_loss = F.cross_entropy(full[0, :-1], ids[0, 1:], reduction="sum")
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    batch = model.prepare_model_inputs_for_cp(ids)
    batch["labels"] = ids
    shard = batch["_cp_make_batch_fn"](mesh, None, batch)
    shard2 = model._cp_shard_batch(mesh, None, batch)  # installing twice is a no-op
    assert torch.equal(shard2["position_ids"], shard["position_ids"])
    out = model(**shard, use_cache=False)
    index = load_balanced_indices(ids.shape[1], world_size, rank)
    errors = {"logits": rel_err(out.logits, full.detach()[:, index])}
    local = F.cross_entropy(
        out.logits[0], shard["shift_labels"][0], ignore_index=-100, reduction="sum"
    )
    local.backward()
    total = local.detach().clone()
    dist.all_reduce(total)
    errors["loss"] = abs(total.item() - ref_loss.item()) / ref_loss.item()
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        errors[name] = rel_err(grad, ref_grads[name])
    return errors


def cp_packed_matches_single_process(rank, world_size, checkpoint, ids, lengths):
    """CP=world_size on rows of several packed documents (one longer than the sliding
    window, document edges inside the CP chunks): logits at this rank's positions, summed
    loss and the gradients summed over ranks equal one process on the packed rows (masked by
    `_build_packed_gemma4_causal_mask_mapping`, RoPE positions restarting per document)."""
    import torch.nn.functional as F

    from am_models_gemma4 import (
        Gemma4ForConditionalGeneration,
        _build_packed_gemma4_causal_mask_mapping,
    )
    from am_models_gemma4.cp import load_balanced_indices
    from am_utils.loss import next_token_targets

    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, backend=cpu_backend())
    model.train()
    seq_ids = torch.stack(
        [
            torch.repeat_interleave(torch.arange(1, len(row) + 1), torch.tensor(row))
            for row in lengths
        ]
    )
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    window = model.config.get_text_config().sliding_window
    masks = _build_packed_gemma4_causal_mask_mapping(
        seq_ids, None, torch.float32, window, as_additive=True
    )
    full = model(ids, attention_mask=masks, position_ids=positions, use_cache=False).logits
    targets = next_token_targets(ids, seq_ids)
    ref_loss = F.cross_entropy(full.flatten(0, 1), targets.flatten(), reduction="sum")
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    # transformers' packing convention: positions restart at every document.
    batch = model.prepare_model_inputs_for_cp(ids, position_ids=positions)
    batch["labels"] = ids
    shard = batch["_cp_make_batch_fn"](mesh, None, batch)
    out = model(**shard, use_cache=False)
    index = load_balanced_indices(ids.shape[1], world_size, rank)
    errors = {"logits": rel_err(out.logits, full.detach()[:, index])}
    local = F.cross_entropy(
        out.logits.flatten(0, 1),
        shard["shift_labels"].flatten(),
        ignore_index=-100,
        reduction="sum",
    )
    local.backward()
    total = local.detach().clone()
    dist.all_reduce(total)
    errors["loss"] = abs(total.item() - ref_loss.item()) / ref_loss.item()
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        errors[name] = rel_err(grad, ref_grads[name])
    return errors


def all_cases(rank, world_size, moe_checkpoint, dense_checkpoint, moe_ids, dense_ids):
    """One spawn for every case (each rank imports torch + transformers only once)."""
    return {
        "moe": moe_ep_fsdp_matches_single_process(rank, world_size, moe_checkpoint, moe_ids),
        "dense": dense_kv_sharing_fsdp_matches_single_process(
            rank, world_size, dense_checkpoint, dense_ids
        ),
        "cp_moe": cp_matches_single_process(rank, world_size, moe_checkpoint, moe_ids[:1, :16]),
        "cp_dense": cp_matches_single_process(
            rank, world_size, dense_checkpoint, dense_ids[:1, :16]
        ),
        # 2 rows of 3 and 2 packed documents (8 and 9 > sliding window 6)
        "cp_packed_moe": cp_packed_matches_single_process(
            rank, world_size, moe_checkpoint, moe_ids, [[5, 8, 3], [7, 9]]
        ),
        "cp_packed_dense": cp_packed_matches_single_process(
            rank, world_size, dense_checkpoint, dense_ids, [[4, 9, 3], [9, 7]]
        ),
    }
