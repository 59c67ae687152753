"""Rank functions for the multi-process am-moe tests (run through am_dtype.testing.run_distributed).

They live in their own module (uniquely named, on sys.path via the test files) because spawned
ranks import the function by module name. Each function runs several checks, since every spawn
costs seconds; a failed check raises, and run_distributed re-raises it with the traceback.

Shape legend: T tokens, D model dim, K top-k, E global experts, L local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from am_moe.dispatch import AllToAllDispatcher

D, E, K = 6, 8, 3
TOL = {"rtol": 1e-12, "atol": 1e-12}


def global_routing(t_global: int, seed: int, route: str):
    """Same tensors on every rank: tokens, per-expert weights, routing, upstream gradient.

    route "uniform": random top-k; "to_first_half": every token picks experts < E/2 only, so
    ranks owning the upper half receive no rows at all.
    """
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(t_global, D, generator=g, dtype=torch.float64)
    w_EDD = torch.randn(E, D, D, generator=g, dtype=torch.float64)
    n_pick = E if route == "uniform" else E // 2
    indices_TK = torch.rand(t_global, n_pick, generator=g).topk(K, dim=-1).indices
    weights_TK = torch.rand(t_global, K, generator=g, dtype=torch.float64)
    probe_TD = torch.randn(t_global, D, generator=g, dtype=torch.float64)
    return x_TD, w_EDD, weights_TK, indices_TK, probe_TD


def dense_experts(x_TD, w_EDD, weights_TK, indices_TK, mask_T):
    """Reference: y_t = sum_k w_tk * x_t @ W[e_tk], zero for masked tokens."""
    y_TKD = torch.einsum("td,tkdf->tkf", x_TD, w_EDD[indices_TK])
    y_TD = (weights_TK.unsqueeze(-1) * y_TKD).sum(1)
    return y_TD * mask_T.unsqueeze(-1).to(y_TD.dtype)


def _grouped_matmul(x_ND, counts_L, w_LDD):
    chunks = torch.split(x_ND, counts_L.tolist())
    return torch.cat([xe @ w_LDD[e] for e, xe in enumerate(chunks)]).reshape(-1, D)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a per-rank tensor over ranks (row counts may differ)."""
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]])
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    width = max(int(s) for s in sizes)
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes, strict=True)])


def _dispatcher_case(rank: int, world: int, route: str, t_per_rank: list[int]) -> dict:
    bounds = [sum(t_per_rank[:r]) for r in range(world + 1)]
    x, w, wt, idx, probe = global_routing(bounds[-1], seed=7, route=route)
    mask = torch.rand(bounds[-1], generator=torch.Generator().manual_seed(3)) > 0.25
    L = E // world
    mine = slice(bounds[rank], bounds[rank + 1])

    disp = AllToAllDispatcher(E, dist.group.WORLD)
    x_l, w_l, wt_l = _leaves(x[mine], w[rank * L : (rank + 1) * L], wt[mine])
    x_ND, counts_L, ctx = disp.dispatch(x_l, wt_l, idx[mine], mask[mine])
    assert counts_L.shape == (L,) and int(counts_L.sum()) == x_ND.shape[0]
    out = disp.combine(_grouped_matmul(x_ND, counts_L, w_l), ctx)
    (out * probe[mine]).sum().backward()

    x_r, w_r, wt_r = _leaves(x, w, wt)
    ref = dense_experts(x_r, w_r, wt_r, idx, mask)
    (ref * probe).sum().backward()
    torch.testing.assert_close(_gather_rows(out.detach()), ref.detach(), **TOL)
    torch.testing.assert_close(_gather_rows(x_l.grad), x_r.grad, **TOL)
    torch.testing.assert_close(_gather_rows(wt_l.grad), wt_r.grad, **TOL)
    torch.testing.assert_close(w_l.grad, w_r.grad[rank * L : (rank + 1) * L], **TOL)
    return {"rows_received": x_ND.shape[0], "dispatch_bytes": disp.stats.dispatch_bytes}


def dispatcher_worker(rank: int, world: int) -> dict:
    """AllToAllDispatcher vs the dense single-process reference, several routings."""
    results = {
        "uniform": _dispatcher_case(rank, world, "uniform", [11 + 3 * r for r in range(world)]),
        # Upper-half ranks receive nothing; the last rank also has no tokens of its own.
        "uneven": _dispatcher_case(rank, world, "to_first_half", [9] * (world - 1) + [0]),
    }
    try:
        AllToAllDispatcher(E + 1, dist.group.WORLD)
    except ValueError as err:
        results["indivisible_error"] = str(err)
    return results


# ---------------------------------------------------------------------------------------------
# Model-level checks: parallelize_model (EP + FSDP2 [+ AC]) vs one process on the global batch
# ---------------------------------------------------------------------------------------------

MODEL_DIM, SEQ = 8, 5


class TinyBlock(torch.nn.Module):
    """Residual block: x + MoE(tanh(proj(x))), so non-expert params sit around the MoE."""

    def __init__(self, config, backend) -> None:
        super().__init__()
        from am_moe.layers import MoE

        self.proj = torch.nn.Linear(MODEL_DIM, MODEL_DIM, dtype=config.dtype)
        self.moe = MoE(config, backend)

    def forward(self, x, padding_mask=None):
        return x + self.moe(torch.tanh(self.proj(x)), padding_mask)


def _fsdp_sync_mixin():
    from am_moe.fsdp_mixin import MoEFSDPSyncMixin

    return MoEFSDPSyncMixin


# Nemotron-H-style routing and experts, run by the default CPU backend (torch._grouped_mm),
# which has no float64 kernel: float32.
NEMOTRON_STYLE = {
    "score_func": "sigmoid", "n_expert_groups": 2, "n_limited_groups": 1, "route_scale": 2.5,
    "force_e_score_correction_bias": True, "expert_activation": "relu2",
    "shared_expert_activation": "relu2", "dtype": torch.float32,
}  # fmt: skip


class TinyMoEModel(torch.nn.Module, _fsdp_sync_mixin()):
    """Two MoE blocks (8 experts, top-2, one shared expert) and a linear head.

    Default: softmax routing, SwiGLU experts on the "torch" loop backend, float64.
    `nemotron=True`: NEMOTRON_STYLE routing (sigmoid, groups, correction bias) and relu2
    experts on the "torch_mm" grouped-mm backend, float32.
    """

    def __init__(
        self,
        n_experts: int = 8,
        uneven: bool = False,
        seed: int = 0,
        nemotron: bool = False,
        async_dispatch: bool = False,
    ) -> None:
        super().__init__()
        from am_dtype.backend import BackendConfig
        from am_moe.config import MoEConfig

        options = dict(
            n_routed_experts=n_experts, n_shared_experts=1, n_activated_experts=2,
            n_expert_groups=1, n_limited_groups=1, train_gate=True, gate_bias_update_factor=0.0,
            aux_loss_coeff=0.0, score_func="softmax", route_scale=1.0, dim=MODEL_DIM,
            inter_dim=16, moe_inter_dim=6, norm_topk_prob=True, router_bias=True,
            expert_activation="swiglu", dtype=torch.float64,
        )  # fmt: skip
        options.update(NEMOTRON_STYLE if nemotron else {})
        config = MoEConfig(**options)
        self.dtype = config.dtype
        self.backend = BackendConfig(
            experts="torch_mm" if nemotron else "torch",
            dispatcher="torch",
            enable_fsdp_optimizations=True,
            dispatcher_async_dispatch=async_dispatch,
        )
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList(TinyBlock(config, self.backend) for _ in range(2))
        self.head = torch.nn.Linear(MODEL_DIM, 3, dtype=config.dtype)
        for block in self.layers:
            block.moe.init_weights(init_std=0.3)
            if nemotron:
                block.moe.gate.e_score_correction_bias.normal_(0.0, 0.5)
            if uneven:
                # Every token picks among the first two experts: EP ranks owning the others
                # receive no rows, and those experts get exactly-zero gradients.
                block.moe.gate.bias.data[2:] = -1e3

    def forward(self, x, padding_mask=None):
        for block in self.layers:
            x = block(x, padding_mask)
        return self.head(x)


def _batch(n_seqs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_seqs, SEQ, MODEL_DIM, generator=g, dtype=torch.float64)
    padding = torch.rand(n_seqs, SEQ, generator=g) < 0.2
    probe = torch.randn(n_seqs, SEQ, 3, generator=g, dtype=torch.float64)
    return x, padding, probe


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _reference(model, micro_batches):
    """Single-process output and grads on the global batch (sum of microbatch losses)."""
    outs, loss = [], 0.0
    for x, padding, probe in micro_batches:
        out = model(x, padding)
        step = (out * probe).sum()
        step.backward()
        outs.append(out.detach())
        loss += float(step.detach())
    grads = {_clean(n): p.grad.clone() for n, p in model.named_parameters()}
    return outs, loss, grads


def _full_grads(model):
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[_clean(name)] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return grads


def _model_case(
    mesh_shape,
    *,
    uneven=False,
    ac=False,
    n_micro=1,
    defer_sync=False,
    fp32_compute=False,
    nemotron=False,
    axis_names=("dp", "ep"),
    async_dispatch=False,
    replicate=False,
) -> dict:
    """parallelize_model on a ("dp", "ep") mesh vs one process, same global batch(es).

    `fp32_compute`: FSDP MixedPrecisionPolicy runs the float64 model in float32 (params and
    gradient reduction), compared at float32 tolerance. `nemotron`: the float32 Nemotron-style
    model on the grouped-mm backend, compared at float32 tolerance. The last axis is the
    expert axis, the others data axes; `replicate`: the first one replicates (HSDP).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from am_moe.parallelizer import parallelize_model

    world, rank = dist.get_world_size(), dist.get_rank()
    seqs_per_rank = 2
    dtype = torch.float32 if nemotron else torch.float64
    batches = [
        tuple(
            t.to(dtype) if t.is_floating_point() else t
            for t in _batch(world * seqs_per_rank, seed=11 + i)
        )
        for i in range(n_micro)
    ]
    ref_outs, ref_loss, ref_grads = _reference(
        TinyMoEModel(uneven=uneven, nemotron=nemotron), batches
    )

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=axis_names)
    mp = MixedPrecisionPolicy(torch.float32, torch.float32) if fp32_compute else None
    model = parallelize_model(
        TinyMoEModel(uneven=uneven, nemotron=nemotron, async_dispatch=async_dispatch),
        mesh,
        dp_axis_names=axis_names[:-1],
        ep_axis_name=axis_names[-1],
        activation_checkpointing=ac,
        mp_policy=mp,
        dp_replicate_axis_name=axis_names[0] if replicate else None,
    )
    if replicate:  # every parameter replicated over the first axis, sharded inside a replica
        kinds = {tuple(type(q).__name__ for q in p.placements) for p in model.parameters()}
        # dense: (replicate, shard) mesh; experts: FSDP's (replicate, shard) on top of ep
        assert kinds == {("Replicate", "Shard"), ("Replicate", "_StridedShard", "Shard")}, kinds
    fp32 = fp32_compute or nemotron
    tol = {"rtol": 1e-4, "atol": 1e-5} if fp32 else TOL
    mine = slice(rank * seqs_per_rank, (rank + 1) * seqs_per_rank)
    if defer_sync:
        model.prepare_for_grad_accumulation()
    loss = torch.zeros((), dtype=torch.float64)
    outs, reduced_after_first = [], None
    for i, (x, padding, probe) in enumerate(batches):
        if defer_sync and i == n_micro - 1:
            model.prepare_for_final_backward()
        out = model(x[mine], padding[mine])
        # FSDP averages gradients over the data ranks; scaling by their count makes the
        # gradient that of the summed global loss, as in the reference.
        step = (out * probe[mine]).sum()
        (step * world).backward()
        loss += step.detach()
        outs.append(out.detach())
        if i == 0:
            # FSDP hands out DTensor (reduce-scattered) grads only after a synced backward;
            # deferred, non-expert grads stay plain local tensors (expert params are DTensors
            # over ep either way).
            reduced_after_first = sum(hasattr(p.grad, "full_tensor") for p in model.parameters())
    dist.all_reduce(loss)
    grads = _full_grads(model)  # collectives first, comparisons after (no rank leaves early)
    for ours, ref in zip(outs, ref_outs, strict=True):
        assert ours.dtype == (torch.float32 if fp32 else torch.float64)
        torch.testing.assert_close(ours.to(ref.dtype), ref[mine], **tol)
    torch.testing.assert_close(float(loss), ref_loss, **tol)
    assert sorted(grads) == sorted(ref_grads), (sorted(grads), sorted(ref_grads))
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, ref_grads[name], **tol, msg=f"grad of {name}")
    experts = model.layers[0].moe.experts
    ref_down = ref_grads["layers.0.moe.experts.down_projs"]
    zero_grad_experts = int((ref_down.abs().sum((1, 2)) == 0).sum())
    return {
        "n_params": len(grads),
        "local_experts": experts.dispatcher.num_local_experts,
        "dispatcher": type(experts.dispatcher).__name__,
        "zero_grad_experts": zero_grad_experts,
        "reduced_after_first_backward": reduced_after_first,
        "async_calls": experts.dispatcher.stats.async_calls,
        # Exact values, so two runs (sync / async dispatch) can be compared bit for bit.
        "outputs": torch.cat([o.flatten() for o in outs]).tolist(),
        "grads": {name: g.flatten().tolist() for name, g in sorted(grads.items())},
    }


class TinyVLM(torch.nn.Module):
    """A vision tower with its own `layers` stack registered before the language model's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.vision_tower = torch.nn.Module()
        self.vision_tower.layers = torch.nn.ModuleList(
            torch.nn.Linear(MODEL_DIM, MODEL_DIM, dtype=torch.float64) for _ in range(2)
        )
        self.language_model = TinyMoEModel()

    def forward(self, x, padding_mask=None):
        v = x
        for block in self.vision_tower.layers:
            v = torch.tanh(block(v))
        return self.language_model(x + v, padding_mask)


def _vlm_case() -> dict:
    """parallelize_model on a VLM over a ("data", "expert") mesh: both stacks become FSDP and
    checkpointing units, and output and gradients equal one process."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from am_moe.parallelizer import parallelize_model

    world, rank = dist.get_world_size(), dist.get_rank()
    x, padding, probe = _batch(world * 2, seed=5)
    ref_outs, _, ref_grads = _reference(TinyVLM(), [(x, padding, probe)])
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data", "expert"))
    model = parallelize_model(
        TinyVLM(),
        mesh,
        dp_axis_names=("data",),
        ep_axis_name="expert",
        activation_checkpointing=True,
    )
    mine = slice(rank * 2, rank * 2 + 2)
    out = model(x[mine], padding[mine])
    ((out * probe[mine]).sum() * world).backward()
    grads = _full_grads(model)
    torch.testing.assert_close(out, ref_outs[0][mine], **TOL)
    assert sorted(grads) == sorted(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=f"grad of {name}")
    stacks = {"vision": model.vision_tower.layers, "language": model.language_model.layers}
    return {
        name: [(isinstance(b, FSDPModule), isinstance(b, CheckpointWrapper)) for b in stack]
        for name, stack in stacks.items()
    } | {
        "expert_mesh": model.language_model.layers[
            0
        ].moe.experts.gate_and_up_projs.device_mesh.mesh_dim_names
    }


def _errors_case() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from am_moe.parallelizer import parallelize_model

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    messages = {}
    for key, call in {
        "indivisible": lambda: parallelize_model(TinyMoEModel(n_experts=world * 2 + 1), mesh),
        "missing_axis": lambda: parallelize_model(TinyMoEModel(), mesh, ep_axis_name="expert"),
        "bad_replicate": lambda: parallelize_model(
            TinyMoEModel(), mesh, dp_replicate_axis_name="rep"
        ),  # fmt: skip
    }.items():
        try:
            call()
        except ValueError as err:
            messages[key] = str(err)
    return messages


def _meta_init_case() -> dict:
    """A model built on the meta device parallelizes, materializes and runs forward/backward."""
    from torch.distributed.device_mesh import init_device_mesh

    from am_moe.parallelizer import parallelize_model

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    with torch.device("meta"):
        model = TinyMoEModel()
    model = parallelize_model(model, mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0.0, 0.3)
    x, padding, _ = _batch(2, seed=1)
    model(x, padding).sum().backward()
    experts = model.layers[0].moe.experts
    return {
        "global_shape": tuple(experts.gate_and_up_projs.shape),
        "finite_grads": all(torch.isfinite(p.grad.to_local()).all() for p in model.parameters()),
    }


def _no_moe_rank_case() -> dict:
    """EP=2 over a mesh whose two data axes flatten, where rank 1's model has no MoE block (as
    a pipeline stage without MoE layers): both ranks must create the same process groups, or
    the next group made by both waits forever on the rank that is one group behind. Rank 0's
    model is on the meta device, so EP splits its experts locally: no scatter over the EP
    group, which in a real pipeline never spans stages with and without MoE."""
    from torch.distributed.device_mesh import init_device_mesh

    from am_moe.parallelizer import parallelize_model

    mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("rep", "shard", "ep"))
    if dist.get_rank() == 0:
        with torch.device("meta"):
            model = TinyMoEModel()
    else:
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([torch.nn.Linear(MODEL_DIM, MODEL_DIM)])
    parallelize_model(model, mesh, dp_axis_names=("rep", "shard"), ep_axis_name="ep")
    group = dist.new_group([0, 1])
    total = torch.ones(1)
    dist.all_reduce(total, group=group)
    return {"sum": float(total)}


def no_moe_rank_worker(rank: int, world: int) -> dict:
    """The case alone (to show it hangs without the fix: run it with a short timeout)."""
    return _run_checks({"no_moe_rank": _no_moe_rank_case})


def _run_checks(checks: dict) -> dict:
    """Run each check; a failure is returned as its traceback, so the others still run."""
    import time
    import traceback

    out = {}
    for name, fn in checks.items():
        start = time.perf_counter()
        try:
            out[name] = ("ok", fn())
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            out[name] = ("fail", traceback.format_exc())
        out[f"{name}_seconds"] = time.perf_counter() - start
    return out


_RESULTS: dict[int, list] = {}


def results(world: int) -> list[dict]:
    """Per-rank check results of the `world`-rank worker, spawned once per test session."""
    from am_dtype.testing import run_distributed

    if world not in _RESULTS:
        worker = {2: ep2_worker, 4: ep4_worker}[world]
        _RESULTS[world] = run_distributed(worker, world, timeout_s=240)
    return _RESULTS[world]


def check_ok(world: int, check: str) -> list:
    """The per-rank payloads of one check; fails with the rank's traceback if it failed."""
    per_rank = results(world)
    for rank, res in enumerate(per_rank):
        status, payload = res[check]
        assert status == "ok", f"rank {rank}, {check}:\n{payload}"
    return [res[check][1] for res in per_rank]


def ep2_worker(rank: int, world: int) -> dict:
    """Two ranks: the dispatcher alone, then EP=2 models (uniform and uneven), then errors."""
    return _run_checks({
        "dispatcher": lambda: dispatcher_worker(rank, world),
        "model_ep2": lambda: _model_case((1, 2)),
        "model_ep2_uneven": lambda: _model_case((1, 2), uneven=True),
        "model_ep2_fp32_compute": lambda: _model_case((1, 2), fp32_compute=True),
        "model_ep2_nemotron_torch_mm": lambda: _model_case((1, 2), nemotron=True),
        "errors": _errors_case,
        "meta_init": _meta_init_case,
        "vlm_custom_axes": _vlm_case,
        "model_ep2_sync": lambda: _model_case((1, 2), uneven=True),
        "model_ep2_async": lambda: _model_case((1, 2), uneven=True, async_dispatch=True),
        "no_moe_rank": _no_moe_rank_case,
    })  # fmt: skip


def ep4_worker(rank: int, world: int) -> dict:
    """Four ranks: EP=4 (uniform, uneven), a 2x2 dp x ep mesh with FSDP2, AC, deferred sync,
    and HSDP (replicate 2 x shard 1) with EP=2."""
    return _run_checks({
        "model_ep4": lambda: _model_case((1, 4)),
        "model_ep4_uneven": lambda: _model_case((1, 4), uneven=True),
        "model_dp2_ep2_ac": lambda: _model_case((2, 2), ac=True),
        "model_dp2_ep2_custom_axes": lambda: _model_case(
            (2, 2), ac=True, axis_names=("data", "expert")
        ),
        "model_hsdp2_ep2": lambda: _model_case(
            (2, 1, 2), axis_names=("rep", "dp", "ep"), replicate=True
        ),
        "accum_synced": lambda: _model_case((2, 2), n_micro=2),
        "accum_deferred": lambda: _model_case((2, 2), n_micro=2, defer_sync=True),
    })  # fmt: skip
