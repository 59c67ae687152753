"""CPU and GPU row layouts for the grouped expert matmuls, the routing plan, and the workspace.

A layout knows how the N routed rows are grouped by expert and runs the per-expert matmuls
on them: `_GroupedRows` (contiguous per expert, `torch._grouped_mm`), `_PaddedRows` (equal
padded blocks, one `torch.bmm`), `_SplitRows` (batched head + grouped tail) and
`blocks._PerExpertRows` (contiguous per expert, run expert by expert).
`_routing_plan` sorts the (token, k) pairs by expert and picks a layout (`CPU_LAYOUTS`);
`_Workspace` keeps the fused path's large transient buffers across calls.

Shape legend: T tokens, K top-k, E experts, L local experts (E without
expert parallelism), N routed rows grouped by expert (sum of counts_L),
R routed rows including padding (N when not padded), D expert input width,
F expert hidden width, F2 = 2F for gated activations (F for relu2).
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from am_moe.experts.pool import _POOL

__all__: list[str] = []  # private building blocks of the expert kernels


# Row layouts of the fused path on CPU: "padded" (one batched matmul over blocks padded to
# the largest load; "split" instead when that would add more than `max_padding` rows),
# "split" (batched head + grouped tail, no padding), "grouped" (one grouped matmul per
# projection), "per_expert" (grouped rows run expert by expert, each expert's whole MLP and
# its backward done on its block while it is in cache: `blocks`), and "auto" (`resolve_layout`).
# Measured at the benchmark shape (32 experts, 2 threads): the first three equal on an idle
# machine; under load and in bf16 (where CPU `_grouped_mm` is slow) "padded" is about 2x
# faster than the other two. At one thread in fp32 (no parallel regions to share) grouped
# rows are the fastest: Nemotron-H MoE block fwd+bwd, 1024 tokens, CPU seconds, 5 interleaved
# repeats: 16 experts top-4 188 ms vs 225 ms padded/split; 64 experts top-8 391 ms vs 448 ms.
# Of the two grouped layouts "per_expert" is the faster at one thread (bench/moe.py shape,
# 4096 tokens, dim 1024, hidden 512, 32 experts top-4, CPU-second medians of 11 interleaved
# repeats, load ~7): fwd+bwd geglu 3.02 s vs 3.31 s, relu2 2.09 s vs 2.17 s; at 1024 tokens,
# 16 experts top-4 the two are within noise.
CPU_LAYOUTS = ("auto", "padded", "split", "grouped", "per_expert")


def resolve_layout(layout: str, dtype: torch.dtype) -> str:
    """The layout "auto" stands for: "per_expert" for fp32/fp64 at one intra-op thread, else
    "padded" (see CPU_LAYOUTS); any other name is returned as it is."""
    if layout != "auto":
        return layout
    if torch.get_num_threads() == 1 and dtype in (torch.float32, torch.float64):
        return "per_expert"
    return "padded"


# The dtypes torch._grouped_mm takes; others (float64) run the per-group loop.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(*tensors: Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned strides and data pointers.
    for t in tensors:
        if t.dtype not in _GROUPED_MM_DTYPES:
            return False
        nbytes = t.element_size()
        if t.data_ptr() % 16 or any((s * nbytes) % 16 for s in t.stride() if s != 1):
            return False
    return True


def _bounds(offs: Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _gmm(x_NA: Tensor, w_LAB: Tensor, offs: Tensor) -> Tensor:
    """out[rows of group g] = x[rows of g] @ w[g]."""
    if _aligned(x_NA, w_LAB):
        return torch._grouped_mm(x_NA, w_LAB, offs=offs)
    out = x_NA.new_empty(x_NA.shape[0], w_LAB.shape[-1])
    for g, (s, e) in enumerate(_bounds(offs)):
        torch.mm(x_NA[s:e], w_LAB[g], out=out[s:e])
    return out


def _gmm_wgrad(a_NA: Tensor, b_NB: Tensor, offs: Tensor) -> Tensor:
    """out[g] = a[rows of g]^T @ b[rows of g]; groups with no rows get zeros."""
    a_AN = a_NA.t()
    if _aligned(a_AN, b_NB):
        return torch._grouped_mm(a_AN, b_NB, offs=offs)
    out = a_NA.new_zeros(offs.numel(), a_NA.shape[1], b_NB.shape[1])
    for g, (s, e) in enumerate(_bounds(offs)):
        if e > s:
            torch.mm(a_AN[:, s:e], b_NB[s:e], out=out[g])
    return out


class _GroupedRows:
    """Layout of N rows grouped by expert, contiguous per expert: `torch._grouped_mm`."""

    def __init__(self, counts_L: Tensor, device: torch.device) -> None:
        self.counts_L = counts_L
        self.offs = torch.cumsum(counts_L, 0).to(device=device, dtype=torch.int32)
        self._group_N: Tensor | None = None

    @property
    def group_N(self) -> Tensor:
        if self._group_N is None:
            ids = torch.arange(self.counts_L.numel(), device=self.offs.device)
            self._group_N = torch.repeat_interleave(ids, self.counts_L.to(self.offs.device))
        return self._group_N

    def mm(self, x_NA: Tensor, w_LAB: Tensor, out: Tensor | None = None) -> Tensor:
        # `out` is only a hint here: `torch._grouped_mm` has no out= form.
        return _gmm(x_NA, w_LAB, self.offs)

    def wgrad(self, a_NA: Tensor, b_NB: Tensor) -> Tensor:
        return _gmm_wgrad(a_NA, b_NB, self.offs)

    def per_row(self, b_LB: Tensor) -> Tensor:
        return b_LB.index_select(0, self.group_N)

    def segment_sum(self, v_NB: Tensor) -> Tensor:
        return v_NB.new_zeros(self.counts_L.numel(), v_NB.shape[1]).index_add_(
            0, self.group_N, v_NB
        )


class _PerExpertRows:
    """Layout of N rows grouped by expert, run expert by expert (`blocks._blocks_forward`)."""

    def __init__(self, counts_L: Tensor, matmul: str = "torch", native=None) -> None:
        self.num_groups = counts_L.numel()
        self.matmul = matmul  # the fp32 matmul kernel, "torch" or "onednn" (`am_dtype.cpu_gemm`)
        # The fused activation kernels (`native.NativeKernels`), or None: ATen ops.
        self.native = native
        ends = torch.cumsum(counts_L, 0).tolist()
        bounds = list(enumerate(zip([0, *ends[:-1]], ends, strict=True)))
        # (expert, first row, end row) of every expert that has rows.
        self.blocks = [(g, s, e) for g, (s, e) in bounds if e > s]
        self.empty = [g for g, (s, e) in bounds if e == s]


def _matmul_operand(w_LAB: Tensor) -> Tensor:
    """w_LAB as the right-hand operand of x @ w, in the memory layout the matmul is fast in.

    On CPU, bf16/fp16 matmuls whose two operands are both row-major run about 10x slower
    than with the right operand column-major (torch 2.15, AVX2, 512x1024 @ 1024x1024 bf16:
    0.8 vs 8.6 GFLOP/s; transformers' experts run x @ W.T on [out, in] weights, the fast
    form). The weights are stored [in, out] row-major, so in those dtypes the forward
    matmuls take a column-major copy (one copy of the weights per call, against matmuls 10x
    slower). The backward's matmuls already read a transposed operand and are fast as they are.
    """
    if w_LAB.device.type == "cpu" and w_LAB.dtype in (torch.bfloat16, torch.float16):
        return w_LAB.transpose(-2, -1).contiguous().transpose(-2, -1)
    return w_LAB


class _PaddedRows:
    """Layout of L blocks of `capacity` rows, expert g's rows first in block g, then padding.

    One batched matmul per projection instead of one matmul per expert: on a CPU shared with
    other processes that is one OpenMP parallel region instead of L, measured 2-3x faster for
    32 experts under load (equal when idle). Padding rows carry routing weight 0, so they add
    nothing to outputs or gradients.
    """

    def __init__(self, num_groups: int, capacity: int) -> None:
        self.num_groups, self.capacity = num_groups, capacity

    def _blocks(self, v_RA: Tensor) -> Tensor:
        return v_RA.view(self.num_groups, self.capacity, v_RA.shape[-1])

    def mm(self, x_RA: Tensor, w_LAB: Tensor, out: Tensor | None = None) -> Tensor:
        if out is None:
            return torch.bmm(self._blocks(x_RA), w_LAB).view(x_RA.shape[0], w_LAB.shape[-1])
        torch.bmm(self._blocks(x_RA), w_LAB, out=self._blocks(out))
        return out

    def wgrad(self, a_RA: Tensor, b_RB: Tensor) -> Tensor:
        return torch.bmm(self._blocks(a_RA).transpose(1, 2), self._blocks(b_RB))

    def per_row(self, b_LB: Tensor) -> Tensor:
        return b_LB.unsqueeze(1).expand(-1, self.capacity, -1).reshape(-1, b_LB.shape[-1])

    def segment_sum(self, v_RB: Tensor) -> Tensor:
        return self._blocks(v_RB).sum(dim=1)


class _SplitRows:
    """Layout without padding: a head of L blocks of `head` rows (every expert's first
    `head` rows, `head` = the smallest load) run as one batched matmul, then each expert's
    remaining rows, grouped, run through `_GroupedRows`.

    Balanced loads put most rows in the head: one parallel region does most of the work
    (see `_PaddedRows`) and no FLOP is spent on padding.
    """

    def __init__(self, counts_L: Tensor, head: int, device: torch.device) -> None:
        self.num_groups, self.head = counts_L.numel(), head
        self.head_rows = self.num_groups * head
        self.tail = _GroupedRows(counts_L - head, device)

    def _head_blocks(self, v_RA: Tensor) -> Tensor:
        return v_RA[: self.head_rows].view(self.num_groups, self.head, v_RA.shape[-1])

    def mm(self, x_RA: Tensor, w_LAB: Tensor, out: Tensor | None = None) -> Tensor:
        if out is None:
            out = x_RA.new_empty(x_RA.shape[0], w_LAB.shape[-1])
        torch.bmm(self._head_blocks(x_RA), w_LAB, out=self._head_blocks(out))
        if x_RA.shape[0] > self.head_rows:
            out[self.head_rows :] = self.tail.mm(x_RA[self.head_rows :], w_LAB)
        return out

    def wgrad(self, a_RA: Tensor, b_RB: Tensor) -> Tensor:
        out = self.tail.wgrad(a_RA[self.head_rows :], b_RB[self.head_rows :])
        return out.baddbmm_(self._head_blocks(a_RA).transpose(1, 2), self._head_blocks(b_RB))

    def per_row(self, b_LB: Tensor) -> Tensor:
        head = b_LB.unsqueeze(1).expand(-1, self.head, -1).reshape(-1, b_LB.shape[-1])
        return torch.cat([head, self.tail.per_row(b_LB)])

    def segment_sum(self, v_RB: Tensor) -> Tensor:
        tail = self.tail.segment_sum(v_RB[self.head_rows :])
        return tail + self._head_blocks(v_RB).sum(dim=1)


class _Workspace:
    """Scratch buffers reused across calls, for the fused path's large transient tensors.

    On CPU a fresh tensor of tens of MB comes from mmap and is zero-filled page by page on
    first touch; at the benchmark shape that made a row gather ~9x slower than the same
    gather into a reused buffer. A buffer handed out here must not outlive the call that
    asked for it (never returned, never saved for backward); one set per thread, shared by
    every MoE layer, each buffer as large as the largest request so far.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        bufs = self._local.__dict__.setdefault("bufs", {})
        key, n = (name, like.dtype, like.device), math.prod(shape)
        buf = bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = bufs[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)

    def clear(self) -> None:
        """Free this thread's buffers."""
        self._local.__dict__.pop("bufs", None)


_WORKSPACE = _Workspace()


@dataclass
class _Scratch:
    """The shared workspace as seen by one fused call (knows the activation's name), and
    the pool for the tensors that outlive the call (`pool._TensorPool`)."""

    act_name: str

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return _WORKSPACE.get(name, tuple(shape), like)

    def lasting(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor that may outlive the call (saved, returned), on recycled storage."""
        return _POOL.empty(tuple(shape), like)


def _lasting(ws: _Scratch | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """`ws.lasting`, or a plain new tensor without a workspace."""
    if ws is None:
        return like.new_empty(shape)
    return ws.lasting(shape, like)


@dataclass
class _Plan:
    """Where each routed row comes from: token `src_R[r]`; real (token, k) pair `pair_N[n]`
    sits at row `slot_N[n]` (None: row n). Padding rows point at token 0 with weight 0.

    `token_rows` (CPU) is the [T, R] 0/1 matrix in CSR form with the rows of each token:
    summing rows back per token is one sparse matmul, several times faster on CPU than
    `index_add_` (which walks the indices serially). Sparse CSR matmul has no bf16 CPU
    kernel, so other dtypes use `index_add_`.
    """

    src_R: Tensor
    pair_N: Tensor
    slot_N: Tensor | None
    rows: _GroupedRows | _PaddedRows | _SplitRows | _PerExpertRows
    token_rows: tuple[Tensor, Tensor] | None = None

    def sum_per_token(self, y_RD: Tensor, num_tokens: int, ws: _Scratch | None = None) -> Tensor:
        """out[t] = sum of the rows of y_RD that belong to token t (on the pool's storage
        with a workspace `ws`)."""
        if self.token_rows is None or y_RD.dtype not in (torch.float32, torch.float64):
            return y_RD.new_zeros(num_tokens, y_RD.shape[1]).index_add_(0, self.src_R, y_RD)
        crow, col = self.token_rows
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            csr = torch.sparse_csr_tensor(
                crow, col, y_RD.new_ones(col.numel()), (num_tokens, y_RD.shape[0]),
                check_invariants=False,
            )  # fmt: skip
        # beta=0 ignores the uninitialised input and out= is that input: no zero-fill of a
        # T x D tensor and no copy of it into a second one.
        out_TD = _lasting(ws, (num_tokens, y_RD.shape[1]), y_RD)
        return torch.addmm(out_TD, csr, y_RD, beta=0, out=out_TD)


def _token_rows(keep: Tensor, pair_N: Tensor, slot_N: Tensor | None, k: int):
    """(crow, col) of the CSR matrix mapping each token to its routed rows, token-major."""
    n = pair_N.numel()
    row_of_pair = torch.full_like(keep, -1, dtype=torch.long)
    row_of_pair[pair_N] = torch.arange(n) if slot_N is None else slot_N
    per_token = keep.view(-1, k).sum(dim=1)
    crow = torch.cat([per_token.new_zeros(1), torch.cumsum(per_token, 0)])
    return crow, row_of_pair[keep]


def _routing_plan(
    indices_TK,
    token_mask_T,
    num_experts: int,
    layout: str,
    max_padding: float = 0.125,
    matmul: str = "torch",
    native=None,
) -> _Plan:
    """Sort the (token, k) pairs by expert and lay the rows out as `layout` (on CPU; "auto"
    is resolved by `resolve_layout` for float32); "per_expert" runs its matmuls by the
    resolved kernel `matmul` ("torch" or "onednn", `am_dtype.cpu_gemm.resolve_cpu_gemm`)
    and its activation on `native` (`native.NativeKernels`) when given."""
    if layout not in CPU_LAYOUTS:
        raise ValueError(f"cpu_layout={layout!r} is not supported; accepted: {list(CPU_LAYOUTS)}")
    layout = resolve_layout(layout, torch.float32)
    flat_expert = indices_TK.reshape(-1)
    keep = token_mask_T.reshape(-1, 1).to(torch.bool).expand_as(indices_TK).reshape(-1)
    # Masked slots sort after every real expert and are cut off.
    key = torch.where(keep, flat_expert, torch.full_like(flat_expert, num_experts))
    sorted_key, order = torch.sort(key, stable=True)
    counts_L = torch.bincount(flat_expert[keep], minlength=num_experts)
    if counts_L.numel() != num_experts:
        raise ValueError(
            f"expert indices must lie in [0, {num_experts}), got up to {counts_L.numel() - 1}"
        )
    n = int(counts_L.sum())
    pair_N = order[:n]
    row_N = torch.div(pair_N, indices_TK.shape[-1], rounding_mode="floor")
    on_cpu = indices_TK.device.type == "cpu"
    if not on_cpu or n == 0 or layout == "grouped":
        plan = _Plan(row_N, pair_N, None, _GroupedRows(counts_L, indices_TK.device))
    elif layout == "per_expert":
        plan = _Plan(row_N, pair_N, None, _PerExpertRows(counts_L, matmul, native))
    else:
        group_N = sorted_key[:n]
        rank_N = torch.arange(n) - (torch.cumsum(counts_L, 0) - counts_L).index_select(0, group_N)
        capacity = int(counts_L.max())
        if layout == "padded" and num_experts * capacity <= (1 + max_padding) * n:
            rows, slot_N = _PaddedRows(num_experts, capacity), group_N * capacity + rank_N
        else:
            head = int(counts_L.min())
            rows = _SplitRows(counts_L, head, indices_TK.device)
            tail_start_L = torch.cumsum(counts_L - head, 0) - (counts_L - head)
            in_tail = rows.head_rows + tail_start_L.index_select(0, group_N) + rank_N - head
            slot_N = torch.where(rank_N < head, group_N * head + rank_N, in_tail)
        src_R = torch.zeros(_num_rows(rows, n), dtype=row_N.dtype).index_copy_(0, slot_N, row_N)
        plan = _Plan(src_R, pair_N, slot_N, rows)
    if on_cpu:
        plan.token_rows = _token_rows(keep, pair_N, plan.slot_N, indices_TK.shape[-1])
    return plan


def _num_rows(rows, n: int) -> int:
    return rows.num_groups * rows.capacity if isinstance(rows, _PaddedRows) else n
