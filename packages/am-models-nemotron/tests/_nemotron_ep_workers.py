"""Spawned-rank bodies for the expert-parallel tests (module level so spawn can import them)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _nemotron_helpers import cpu_backend, rel_err
from torch.distributed.device_mesh import init_device_mesh

os.environ.setdefault("AM_DTYPE_COMPILE_RMSNORM", "0")


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = g.to_local() if hasattr(g, "to_local") else g
    return out


def ep_matches_single_process(rank: int, world_size: int, checkpoint: str, ids: torch.Tensor):
    """EP=world_size model on rank-local data vs. the whole batch on one unsharded model."""
    from am_models_nemotron import NemotronHForCausalLM
    from am_moe.parallelizer import apply_ep
    from am_utils.checkpointing import read_hf_state_dict

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    reference = NemotronHForCausalLM.from_pretrained(checkpoint, backend=cpu_backend()).train()
    losses = [reference(ids[i : i + 1], labels=ids[i : i + 1]).loss for i in range(world_size)]
    ref_loss = torch.stack(losses).mean()
    ref_loss.backward()
    ref_grads = _grads(reference)

    model = NemotronHForCausalLM.from_pretrained(checkpoint, backend=cpu_backend()).train()
    apply_ep(model, mesh)
    # EP-aware loading: this rank reads only its experts, as DTensor shards.
    local = model.state_dict_adapter.from_hf(read_hf_state_dict(checkpoint), device_mesh=mesh)
    first, last = rank * 2, rank * 2 + 2  # 4 experts over 2 ranks
    up = local["model.layers.1.mixer.experts.gate_and_up_projs"]
    assert up.to_local().shape[0] == 2
    full_up = reference.model.layers["1"].mixer.experts.gate_and_up_projs.detach()
    assert torch.equal(up.to_local(), full_up[first:last])
    model.load_state_dict(local)

    # Saving gathers the expert shards: the files equal the checkpoint we started from.
    saved = os.path.join(checkpoint, "ep_saved")
    model.save_pretrained(saved)
    original, written = read_hf_state_dict(checkpoint), read_hf_state_dict(saved)
    assert set(original) == set(written)
    assert all(torch.equal(original[k], written[k]) for k in original)

    loss = model(ids[rank : rank + 1], labels=ids[rank : rank + 1]).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    errors = {"loss": abs(mean_loss.item() - ref_loss.item())}
    for name, grad in _grads(model).items():
        if "experts." in name and "shared_experts" not in name:
            # This rank's experts saw every rank's tokens: the sum of the per-rank losses' grads.
            expected = ref_grads[name][first:last] * world_size
        else:
            dist.all_reduce(grad)
            grad /= world_size
            expected = ref_grads[name]
        errors[name] = rel_err(grad, expected)
    return errors


def ep_rank_with_empty_batch(rank: int, world_size: int, ids: torch.Tensor):
    """EP over 2 ranks where rank 1 has no tokens: both finish forward and backward, and the
    summed gradients equal one process on rank 0's batch alone (rank 1 adds zeros)."""
    import copy

    from _nemotron_helpers import tiny_config

    from am_models_nemotron import NemotronHForCausalLM
    from am_moe.parallelizer import apply_ep

    torch.manual_seed(0)  # the same weights on every rank
    cfg = tiny_config(num_nextn_predict_layers=1, mtp_layers_block_type=["moe"])
    model = NemotronHForCausalLM(cfg, backend=cpu_backend())
    model.initialize_weights(dtype=torch.float32)
    reference = copy.deepcopy(model)
    ref_loss = reference(ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = _grads(reference)

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    apply_ep(model, mesh)
    local = ids if rank == 0 else ids[:0]  # rank 1: an empty [0, S] batch
    out = model(local, labels=local)
    out.loss.backward()
    errors = {"loss": abs(out.loss.item() - (ref_loss.item() if rank == 0 else 0.0))}
    errors["logits_shape"] = tuple(out.logits.shape)
    first, last = rank * 2, rank * 2 + 2  # 4 experts over 2 ranks
    for name, grad in _grads(model).items():
        if grad is None:
            errors[name] = float("inf")
            continue
        if "experts." in name and "shared_experts" not in name:
            expected = ref_grads[name][first:last]  # this rank's experts saw rank 0's tokens
        else:
            dist.all_reduce(grad)
            expected = ref_grads[name]
        errors[name] = rel_err(grad, expected)
    return errors


def _mtp_model():
    from _nemotron_helpers import tiny_config

    from am_models_nemotron import NemotronHForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(num_nextn_predict_layers=2, mtp_layers_block_type=["full_attention", "moe"])
    model = NemotronHForCausalLM(cfg, backend=cpu_backend())
    model.initialize_weights(dtype=torch.float32)
    return model.train()


def parallelize_with_mtp_on_custom_axes(rank: int, world_size: int, ids: torch.Tensor):
    """parallelize_model on Nemotron-H with MTP over a ("data", "expert") mesh.

    Every decoder and MTP block becomes an FSDP and checkpointing unit; the loss (main +
    MTP) and every gradient equal one process on the whole batch; the state-dict adapter
    reads this rank's experts through the same `ep_axis_name`.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    from am_moe.parallelizer import parallelize_model

    reference = _mtp_model()
    ref_loss = torch.stack(
        [reference(ids[i : i + 1], labels=ids[i : i + 1]).loss for i in range(world_size)]
    ).mean()
    ref_loss.backward()
    ref_grads = _grads(reference)
    hf = reference.state_dict_adapter.to_hf(reference.state_dict())

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("data", "expert"))
    model = parallelize_model(
        _mtp_model(),
        mesh,
        dp_axis_names=("data",),
        ep_axis_name="expert",
        activation_checkpointing=True,
    )
    local = model.state_dict_adapter.from_hf(hf, device_mesh=mesh, ep_axis_name="expert")
    up = local["mtp.layers.1.mixer.experts.gate_and_up_projs"]
    full_up = reference.mtp.layers["1"].mixer.experts.gate_and_up_projs.detach()
    per_rank = full_up.shape[0] // world_size
    loaded_local = torch.equal(up.to_local(), full_up[rank * per_rank : (rank + 1) * per_rank])

    loss = model(ids[rank : rank + 1], labels=ids[rank : rank + 1]).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    errors = {"loss": abs(mean_loss.item() - ref_loss.item())}
    for name, p in model.named_parameters():
        clean = name.replace("_checkpoint_wrapped_module.", "")
        errors[clean] = rel_err(p.grad.full_tensor(), ref_grads[clean])
    units = {
        stack: [
            (isinstance(b, FSDPModule), isinstance(b, CheckpointWrapper)) for b in blocks.values()
        ]
        for stack, blocks in (("decoder", model.model.layers), ("mtp", model.mtp.layers))
    }
    return {"errors": errors, "units": units, "loaded_local_experts": loaded_local}
