"""Rank functions and library emulations for the GPU kernel-library dispatcher tests.

There is no GPU here, so DeepEP (`deep_ep.Buffer`, `deep_ep.HybridEPBuffer`) and UCCL-EP
(`uccl.ep.Buffer`) are replaced by emulations of their public Python APIs built on plain
`torch.distributed` collectives (gloo, CPU). `install_fake_libraries` writes thin `deep_ep`
and `uccl` packages that re-export them into a directory the ranks put on `sys.path`, so the
dispatchers import them exactly as they import the real libraries.

The emulations follow the libraries' documented semantics, return tuples and dtype checks
(DeepEP/UCCL: `deep_ep/buffers/legacy.py`, `uccl/ep/buffer.py`; HybridEP:
`deep_ep/hybrid_ep_buffer.py` and its `tests/test_hybrid_ep.py`):

- DeepEP-style `dispatch` sends each token once to every rank owning one of its experts;
  received `recv_topk_idx` holds local expert ids, -1 for experts elsewhere (weight 0 there);
  `combine(x, handle, topk_weights)` sums the rows of a token coming back from each rank (and
  the weights); a cached `dispatch(x, handle=...)` replays the layout without top-k.
- HybridEP `dispatch` all-gathers the routing map (equal token counts on every rank), returns
  the received rows in (source rank, token) order, probs of the NVLink domain's experts, and a
  handle whose item 4 is the local-expert routing map (longer than the received rows, as the
  library's own test slices it); `combine` sums rows (and probs, into [T, E]) over ranks.
- Strict mode (`STRICT["dtypes"]`) also demands bf16 activations where the kernels do
  (DeepEP combine, HybridEP 16-bit tokens); the float64 exactness runs turn it off.
Events are returned as None; CUDA-only knobs (`async_finish`, `previous_event`, ...) are
accepted and ignored.

Shape legend: T tokens, D model dim, K top-k, E global experts, L local experts, P ranks,
V rows received by a rank, W experts of an NVLink domain.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
from _am_moe_ep_workers import _run_checks  # the tests dir is on sys.path in every rank

from am_moe.dispatch import DeepEPDispatcher, HybridEPDispatcher, UCCLEPDispatcher

D, E, K = 8, 8, 3
TOL = {"rtol": 1e-12, "atol": 1e-12}
# Routing weights travel as float32, so their gradients are rounded to float32.
TOL_W = {"rtol": 1e-6, "atol": 1e-6}
BACKENDS = {"deepep": DeepEPDispatcher, "hybridep": HybridEPDispatcher, "uccl_ep": UCCLEPDispatcher}

STRICT = {"dtypes": True}
CALLS: Counter = Counter()  # (library, method, activation dtype) -> calls on this rank

_FAKE_PACKAGES = {
    "deep_ep/__init__.py": (
        "import torch\n"
        "from _am_moe_kernel_ep_workers import EmulatedConfig as Config\n"
        "from _am_moe_kernel_ep_workers import EmulatedDeepEPBuffer as Buffer\n"
        "from _am_moe_kernel_ep_workers import EmulatedHybridEPBuffer as HybridEPBuffer\n"
        "topk_idx_t = torch.int64\n"
    ),
    "uccl/__init__.py": "",
    "uccl/ep/__init__.py": (
        "from _am_moe_kernel_ep_workers import EmulatedConfig as Config\n"
        "from _am_moe_kernel_ep_workers import EmulatedUCCLBuffer as Buffer\n"
    ),
}


def install_fake_libraries(root: str) -> None:
    """Write the `deep_ep` and `uccl` shims under `root`."""
    for rel, text in _FAKE_PACKAGES.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


# ---------------------------------------------------------------------------------------------
# Collective helpers (no autograd: the libraries' kernels are not differentiable either)
# ---------------------------------------------------------------------------------------------


def _all_gather_rows(t: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of `t`, concatenated in rank order, and each rank's row count."""
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]])
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s) for s in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)]), counts


def _sum_to_sources(rows: torch.Tensor, global_row: torch.Tensor, counts: list[int], group):
    """Add each row into its global source token, sum over ranks, keep this rank's tokens."""
    acc_dtype = torch.float32 if rows.dtype in (torch.bfloat16, torch.float16) else rows.dtype
    total = rows.new_zeros((sum(counts), *rows.shape[1:]), dtype=acc_dtype)
    total.index_add_(0, global_row, rows.to(acc_dtype))
    dist.all_reduce(total, group=group)
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    return total[start : start + counts[rank]].to(rows.dtype)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"library emulation: {what}")


# ---------------------------------------------------------------------------------------------
# DeepEP / UCCL-EP normal-mode Buffer
# ---------------------------------------------------------------------------------------------


class EmulatedConfig:
    """`deep_ep.Config(num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv)` with size hints."""

    def __init__(self, num_sms, nvl_send=6, nvl_recv=256, rdma_send=6, rdma_recv=128) -> None:
        self.num_sms = num_sms
        self.nvl_recv = nvl_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return (self.num_sms // 2) * num_ranks * self.nvl_recv * hidden_bytes

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0  # intranode: no RDMA buffer


class EmulatedDeepEPBuffer:
    """`deep_ep.Buffer` normal (intranode) mode over gloo collectives."""

    library = "deep_ep"
    num_sms: int = 20

    def __init__(
        self,
        group,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        **_ignored,
    ) -> None:
        _check(not low_latency_mode, "only the normal mode is emulated")
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        CALLS[(self.library, "__init__", None)] += 1

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        _check(new_num_sms % 2 == 0, "the SM count must be even")
        cls.num_sms = new_num_sms

    @classmethod
    def get_dispatch_config(cls, num_ranks: int) -> EmulatedConfig:
        _check(num_ranks in (2, 4, 8, 16, 24, 32), f"unsupported number of EP ranks {num_ranks}")
        return EmulatedConfig(cls.num_sms, 24, 256, 6, 128)

    @classmethod
    def get_combine_config(cls, num_ranks: int) -> EmulatedConfig:
        _check(num_ranks in (2, 4, 8, 16, 24, 32), f"unsupported number of EP ranks {num_ranks}")
        return EmulatedConfig(cls.num_sms, 10, 256, 6, 128)

    def get_dispatch_layout(
        self,
        topk_idx,
        num_experts,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        """(num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, event)."""
        _check(topk_idx.dim() == 2 and topk_idx.dtype == torch.int64, "topk_idx int64 [T, K]")
        p, L = self.group_size, num_experts // self.group_size
        valid = topk_idx >= 0
        dest = torch.where(valid, torch.div(topk_idx, L, rounding_mode="floor"), -1)
        is_token_in_rank = (dest.unsqueeze(-1) == torch.arange(p)).any(dim=1)
        per_rank = is_token_in_rank.sum(0).to(torch.int32)
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
        return per_rank, None, per_expert, is_token_in_rank, None

    def _received(self, is_token_in_rank):
        """Global row ids (rank-major) this rank receives, in (source rank, token) order."""
        everyone, counts = _all_gather_rows(is_token_in_rank, self.group)
        rows = everyone[:, self.rank].nonzero().flatten()
        starts = torch.tensor([sum(counts[:r]) for r in range(self.group_size)])
        src_rank = torch.searchsorted(starts, rows, right=True) - 1
        return rows, src_rank, counts

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment=1,
        num_worst_tokens=0,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        """(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event); with a handle: (recv_x, None, None, None, None, event)."""
        _check(x.dim() == 2 and x.is_contiguous(), "x must be a contiguous [T, D] tensor")
        _check((x.shape[1] * x.element_size()) % 16 == 0, "hidden bytes must divide by 16")
        CALLS[(self.library, "dispatch", x.dtype)] += 1
        if handle is not None:
            _check(topk_idx is None and topk_weights is None, "cached dispatch takes no top-k")
            _, _, _, recv_src_idx, is_token_in_rank, _ = handle
            rows, _, _ = self._received(is_token_in_rank)
            _check(rows.numel() == recv_src_idx.numel(), "handle does not match this layout")
            recv_x = _all_gather_rows(x, self.group)[0].index_select(0, rows)
            return recv_x, None, None, None, None, None
        _check(
            num_tokens_per_rank is not None
            and is_token_in_rank is not None
            and num_tokens_per_expert is not None,
            "dispatch without a handle needs the layout",
        )
        _check(num_tokens_per_rank.dtype == torch.int32, "num_tokens_per_rank int32")
        _check(num_tokens_per_expert.dtype == torch.int32, "num_tokens_per_expert int32")
        _check(is_token_in_rank.dtype == torch.bool, "is_token_in_rank bool")
        _check(is_token_in_rank.shape == (x.shape[0], self.group_size), "is_token_in_rank shape")
        num_experts = num_tokens_per_expert.numel()
        L = num_experts // self.group_size
        rows, src_rank, counts = self._received(is_token_in_rank)
        recv_x = _all_gather_rows(x, self.group)[0].index_select(0, rows)
        recv_idx = recv_w = None
        if topk_idx is not None:
            _check(topk_idx.dtype == torch.int64 and topk_idx.is_contiguous(), "topk_idx int64")
            _check(topk_weights is not None, "topk_idx and topk_weights come together")
            _check(topk_weights.dtype == torch.float32, "topk_weights must be float32")
            _check(topk_weights.is_contiguous(), "topk_weights must be contiguous")
            idx = _all_gather_rows(topk_idx, self.group)[0].index_select(0, rows)
            w = _all_gather_rows(topk_weights, self.group)[0].index_select(0, rows)
            lo = self.rank * L
            local = (idx >= lo) & (idx < lo + L)
            recv_idx = torch.where(local, idx - lo, -1)
            recv_w = torch.where(local, w, 0.0)
        per_expert = [
            int((recv_idx == e).any(dim=1).sum()) if recv_idx is not None else 0 for e in range(L)
        ]
        per_expert = [-(-n // expert_alignment) * expert_alignment for n in per_expert]
        starts = torch.tensor([sum(counts[:r]) for r in range(self.group_size)])
        recv_src_idx = (rows - starts[src_rank]).to(torch.int32)
        per_src = torch.bincount(src_rank, minlength=self.group_size)
        rank_prefix_matrix = torch.zeros(self.group_size, self.group_size, dtype=torch.int32)
        rank_prefix_matrix[:, self.rank] = per_src.cumsum(0).to(torch.int32)
        send_head = torch.full((x.shape[0], self.group_size), -1, dtype=torch.int32)
        channels = torch.zeros(self.group_size, 1, dtype=torch.int32)
        handle = (
            rank_prefix_matrix,
            channels,
            channels.clone(),
            recv_src_idx,
            is_token_in_rank,
            send_head,
        )
        return recv_x, recv_idx, recv_w, per_expert, handle, None

    def combine(
        self,
        x,
        handle,
        topk_weights=None,
        bias=None,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        """(combined_x, combined_topk_weights or None, event): sums over the ranks."""
        _check(bias is None, "bias is not emulated")
        _check(x.dim() == 2 and x.is_contiguous(), "x must be a contiguous [V, D] tensor")
        if STRICT["dtypes"]:
            _check(x.dtype == torch.bfloat16, f"combine supports bf16 only, got {x.dtype}")
        CALLS[(self.library, "combine", x.dtype)] += 1
        _, _, _, recv_src_idx, is_token_in_rank, _ = handle
        _check(x.shape[0] == recv_src_idx.numel(), "x rows must be the received token count")
        rows, _, counts = self._received(is_token_in_rank)
        combined_x = _sum_to_sources(x, rows, counts, self.group)
        combined_w = None
        if topk_weights is not None:
            _check(topk_weights.dtype == torch.float32, "topk_weights must be float32")
            _check(topk_weights.shape[0] == x.shape[0], "topk_weights rows")
            combined_w = _sum_to_sources(topk_weights, rows, counts, self.group)
        return combined_x, combined_w, None


class EmulatedUCCLBuffer(EmulatedDeepEPBuffer):
    """`uccl.ep.Buffer`: the same API as DeepEP's `Buffer` (its own class, own call counts)."""

    library = "uccl"
    num_sms: int = 20


# ---------------------------------------------------------------------------------------------
# HybridEP
# ---------------------------------------------------------------------------------------------


class EmulatedHybridEPBuffer:
    """`deep_ep.HybridEPBuffer` dispatch/combine (without permute) over gloo collectives."""

    library = "hybrid_ep"

    def __init__(
        self,
        group,
        hidden_dim: int,
        max_num_of_tokens_per_rank: int,
        num_local_experts: int,
        use_fp8: bool = False,
        num_sms_dispatch_api=None,
        num_sms_combine_api=None,
        num_sms_preprocessing_api=None,
        num_sms_permute_api=None,
        num_of_ranks_per_nvlink_domain=None,
        use_mnnvl=None,
    ) -> None:
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        _check(self.group_size > 1, "hybrid-ep needs at least 2 ranks")
        if num_of_ranks_per_nvlink_domain is None:
            num_of_ranks_per_nvlink_domain = int(os.getenv("NUM_OF_RANKS_PER_NVLINK_DOMAIN", "8"))
        _check(
            self.group_size % num_of_ranks_per_nvlink_domain == 0,
            "the number of ranks must divide by the ranks per NVLink domain",
        )
        self.num_of_ranks_per_nvlink_domain = num_of_ranks_per_nvlink_domain
        self.local_rank = self.rank % num_of_ranks_per_nvlink_domain
        self.node_rank = self.rank // num_of_ranks_per_nvlink_domain
        self.num_local_experts = num_local_experts
        CALLS[(self.library, "__init__", None)] += 1

    def dispatch(
        self,
        hidden,
        scaling_factor=None,
        topk_idx=None,
        topk_weights=None,
        num_of_experts=None,
        probs=None,
        routing_map=None,
        num_dispatched_tokens_tensor=None,
        num_dispatched_tokens=None,
        handle=None,
    ):
        """(dispatched_token, dispatched_probs, dispatched_scaling_factor, handle)."""
        t = hidden.shape[0]
        if routing_map is not None:
            _check(routing_map.dtype == torch.bool, "routing_map must be bool")
            num_of_experts = routing_map.shape[-1]
        else:
            _check(num_of_experts is not None, "index-based routing needs num_of_experts")
            if topk_idx is not None:  # the library's indices_to_map: -1 would fail the scatter
                routing_map = torch.zeros(t, num_of_experts, dtype=torch.bool)
                routing_map = routing_map.scatter(1, topk_idx.to(torch.int64), True)
                if topk_weights is not None:
                    probs = torch.zeros(t, num_of_experts).scatter(1, topk_idx, topk_weights)
        _check(handle is not None or routing_map is not None, "need a handle or a routing map")
        if STRICT["dtypes"]:
            _check(hidden.element_size() == 2, f"tokens travel as 16-bit, got {hidden.dtype}")
        _check(hidden.dim() == 2 and hidden.is_contiguous(), "hidden must be contiguous [T, D]")
        CALLS[(self.library, "dispatch", hidden.dtype)] += 1
        L = self.num_local_experts
        if handle is None:
            global_map, counts = _all_gather_rows(routing_map, self.group)
            _check(
                len(set(counts)) == 1, f"all_gather_into_tensor needs equal token counts {counts}"
            )
            lo = self.rank * L
            rows = global_map[:, lo : lo + L].any(dim=1).nonzero().flatten()
            local_map = global_map.index_select(0, rows)[:, lo : lo + L]
            # The library's map is sized for the worst case; only the first V rows are valid.
            padded_map = torch.cat([local_map, torch.ones(3, L, dtype=torch.bool)])
            num_tokens = torch.tensor([rows.numel()], dtype=torch.int32)
            handle = (rows, None, None, num_tokens, padded_map, t, None)
        rows, _, _, num_tokens, _, t_handle, _ = handle
        _check(t == t_handle, "the handle belongs to another token count")
        dispatched = _all_gather_rows(hidden, self.group)[0].index_select(0, rows)
        dispatched_probs = None
        if probs is not None:
            _check(probs.dtype == torch.float32, "probs must be float32")
            w = L * self.num_of_ranks_per_nvlink_domain
            domain = slice(self.node_rank * w, (self.node_rank + 1) * w)
            dispatched_probs = _all_gather_rows(probs, self.group)[0][rows][:, domain]
        return dispatched, dispatched_probs, None, handle

    def combine(self, hidden, probs=None, handle=None):
        """(combined_token [T, D], combined_probs [T, E] or None): sums over the ranks."""
        _check(handle is not None, "the handle is necessary for combine")
        if STRICT["dtypes"]:
            _check(
                hidden.dtype == torch.bfloat16, f"combine supports bf16 only, got {hidden.dtype}"
            )
        CALLS[(self.library, "combine", hidden.dtype)] += 1
        rows, _, _, num_tokens, _, t, _ = handle
        _check(hidden.shape[0] == int(num_tokens), "hidden rows must be the dispatched count")
        counts = [t] * self.group_size
        combined = _sum_to_sources(hidden, rows, counts, self.group)
        combined_probs = None
        if probs is not None:
            _check(probs.dtype == torch.float32, "probs must be float32")
            w = probs.shape[-1]
            n_experts = w * self.group_size // self.num_of_ranks_per_nvlink_domain
            full = probs.new_zeros(probs.shape[0], n_experts)
            full[:, self.node_rank * w : (self.node_rank + 1) * w] = probs
            combined_probs = _sum_to_sources(full, rows, counts, self.group)
        return combined, combined_probs


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _routing(t_global: int, route: str, seed: int = 7):
    """Same tensors on every rank; weights are float32 numbers (they travel as float32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t_global, D, generator=g, dtype=torch.float64)
    w = torch.randn(E, D, D, generator=g, dtype=torch.float64)
    n_pick = E if route == "uniform" else E // 2
    idx = torch.rand(t_global, n_pick, generator=g).topk(K, dim=-1).indices
    wt = torch.rand(t_global, K, generator=g).to(torch.float64)
    probe = torch.randn(t_global, D, generator=g, dtype=torch.float64)
    mask = torch.rand(t_global, generator=g) > 0.25
    return x, w, wt, idx, probe, mask


def _dense(x, w, wt, idx, mask):
    y = torch.einsum("td,tkdf->tkf", x, w[idx])
    return (wt.unsqueeze(-1) * y).sum(1) * mask.unsqueeze(-1).to(x.dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _dispatcher_case(rank, world, name, route, t_per_rank, exact) -> dict:
    """One dispatcher vs the dense single-process reference: output and every gradient."""
    bounds = [sum(t_per_rank[:r]) for r in range(world + 1)]
    x, w, wt, idx, probe, mask = _routing(bounds[-1], route)
    L = E // world
    mine = slice(bounds[rank], bounds[rank + 1])
    STRICT["dtypes"] = not exact
    disp = BACKENDS[name](E, dist.group.WORLD, comm_dtype=None if exact else torch.bfloat16)
    before = Counter(CALLS)
    x_l, w_l, wt_l = _leaves(x[mine], w[rank * L : (rank + 1) * L], wt[mine])
    x_ND, counts_L, ctx = disp.dispatch(x_l, wt_l, idx[mine], mask[mine])
    assert counts_L.dtype == torch.int64 and counts_L.shape == (L,)
    assert int(counts_L.sum()) == x_ND.shape[0] and x_ND.dtype == torch.float64
    y = torch.cat([xe @ w_l[e] for e, xe in enumerate(torch.split(x_ND, counts_L.tolist()))])
    out = disp.combine(y.reshape(-1, D), ctx)
    assert out.shape == x_l.shape and out.dtype == torch.float64
    (out * probe[mine]).sum().backward()

    x_r, w_r, wt_r = _leaves(x, w, wt)
    ref = _dense(x_r, w_r, wt_r, idx, mask)
    (ref * probe).sum().backward()
    tol, tol_w = (TOL, TOL_W) if exact else ({"rtol": 3e-2, "atol": 5e-2},) * 2
    torch.testing.assert_close(out.detach(), ref.detach()[mine], **tol)
    torch.testing.assert_close(x_l.grad, x_r.grad[mine], **tol)
    torch.testing.assert_close(w_l.grad, w_r.grad[rank * L : (rank + 1) * L], **tol)
    torch.testing.assert_close(wt_l.grad, wt_r.grad[mine], **tol_w)
    masked = ~mask[mine]
    assert torch.all(out.detach()[masked] == 0) and torch.all(x_l.grad[masked] == 0)
    assert torch.all(wt_l.grad[masked] == 0)
    calls = {}
    for (lib, op, dt), n in CALLS.items():
        if n > before[(lib, op, dt)]:
            calls[f"{lib}.{op}.{str(dt).removeprefix('torch.')}"] = n - before[(lib, op, dt)]
    return {"rows_received": x_ND.shape[0], "calls": calls}


def _model_case(name: str, uneven: bool = False) -> dict:
    """parallelize_model with EP=2 and the named dispatcher vs one process, float64 model."""
    from _am_moe_ep_workers import TinyMoEModel, _batch, _full_grads, _reference
    from torch.distributed.device_mesh import init_device_mesh

    from am_dtype.backend import BackendConfig
    from am_moe.parallelizer import parallelize_model

    STRICT["dtypes"] = False
    world, rank = dist.get_world_size(), dist.get_rank()
    x, padding, probe = _batch(2 * world, seed=11)
    ref_outs, ref_loss, ref_grads = _reference(TinyMoEModel(uneven=uneven), [(x, padding, probe)])
    backend = BackendConfig(experts="torch", dispatcher="torch")
    backend.dispatcher = name  # BackendConfig checks for the real package; the shim is here
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    model = parallelize_model(TinyMoEModel(uneven=uneven), mesh, backend=backend)
    for block in model.layers:
        assert type(block.moe.experts.dispatcher) is BACKENDS[name]
        block.moe.experts.dispatcher.comm_dtype = None  # float64 on the wire: exact rows
    mine = slice(2 * rank, 2 * rank + 2)
    out = model(x[mine], padding[mine])
    step = (out * probe[mine]).sum()
    (step * world).backward()  # FSDP averages over the data ranks
    loss = step.detach().clone()
    dist.all_reduce(loss)
    grads = _full_grads(model)
    # Routing weights travel as float32: everything downstream of them is float32-exact.
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out.detach(), ref_outs[0][mine], **tol)
    torch.testing.assert_close(float(loss), ref_loss, **tol)
    assert sorted(grads) == sorted(ref_grads)
    for key, g in grads.items():
        torch.testing.assert_close(g, ref_grads[key], **tol, msg=f"grad of {key}")
    down = ref_grads["layers.0.moe.experts.down_projs"]
    return {"n_params": len(grads), "zero_grad_experts": int((down.abs().sum((1, 2)) == 0).sum())}


def _errors_case() -> dict:
    messages = {}
    for name, cls in BACKENDS.items():
        try:
            cls(E + 1, dist.group.WORLD)
        except ValueError as err:
            messages[f"{name}_indivisible"] = str(err)
    from am_dtype.backend import BackendConfig

    odd = BackendConfig(dispatcher_num_sms=7)
    try:
        DeepEPDispatcher(E, dist.group.WORLD, backend=odd)
    except ValueError as err:
        messages["odd_sms"] = str(err)
    return messages


def kernel_ep2_worker(rank: int, world: int, fake_root: str) -> dict:
    """All kernel-library checks on two ranks, each library through its emulation."""
    import sys

    sys.path.insert(0, fake_root)
    checks = {}
    for name in BACKENDS:
        checks.update({
            f"{name}_uniform": lambda n=name: _dispatcher_case(
                rank, world, n, "uniform", [11, 14], exact=True
            ),
            # Rank 1 owns experts 4..7, which no token picks, and has no tokens of its own.
            f"{name}_uneven": lambda n=name: _dispatcher_case(
                rank, world, n, "to_first_half", [9, 0], exact=True
            ),
            f"{name}_bf16": lambda n=name: _dispatcher_case(
                rank, world, n, "uniform", [10, 7], exact=False
            ),
            f"{name}_model": lambda n=name: _model_case(n),
            # Every token picks experts 0..1: EP rank 1 receives no rows in either block.
            f"{name}_model_uneven": lambda n=name: _model_case(n, uneven=True),
        })  # fmt: skip
    checks["errors"] = _errors_case
    return _run_checks(checks)


_RESULTS: list = []


def results() -> list[dict]:
    """Per-rank results of the two-rank worker, spawned once per test session."""
    from am_dtype.testing import run_distributed

    if not _RESULTS:
        with tempfile.TemporaryDirectory() as root:
            install_fake_libraries(root)
            _RESULTS.append(run_distributed(kernel_ep2_worker, 2, root, timeout_s=240))
    return _RESULTS[0]


def check_ok(check: str) -> list:
    """The per-rank payloads of one check; fails with the rank's traceback if it failed."""
    per_rank = results()
    for rank, res in enumerate(per_rank):
        status, payload = res[check]
        assert status == "ok", f"rank {rank}, {check}:\n{payload}"
    return [res[check][1] for res in per_rank]
