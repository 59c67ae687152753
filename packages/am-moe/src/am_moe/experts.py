"""Routed experts: stacked expert weights and the kernels that run them.

`GroupedExperts` keeps every expert's weights in two stacked parameters and
runs them on rows that a token dispatcher has grouped by expert:

- `gate_and_up_projs` [E, D, 2F] for gated activations (columns [:F] are the
  gate half, [F:] the up half) or [E, D, F] for "relu2";
- `down_projs` [E, F, D];
- optional `gate_up_proj_bias` [E, 2F or F] and `down_proj_bias` [E, D].

Weights are stored input-major (x @ w), so one expert's projection is a plain
matmul and the stack is a grouped matmul. `run_experts` picks a kernel by
name (`BackendConfig.experts`):

- "torch": a per-expert loop of matmuls under ordinary autograd.
- "torch_mm": one `torch._grouped_mm` per projection with offsets from the
  per-expert counts, inside a custom autograd function that keeps only the
  input rows and the pre-activation for backward and recomputes the
  activation there (the grad is made contiguous: `_grouped_mm` rejects the
  stride-0 grads that `y.sum().backward()` produces). Without expert
  parallelism `GroupedExperts` runs gather -> experts -> weighted sum as one
  autograd function (`_LocalMoE`): the routing weight scales the N x F
  activation instead of the N x D output, and neither the gathered rows nor
  the unweighted outputs are kept for backward. On CPU, when the experts'
  loads are within 12.5% of each other, rows are laid out in equal padded
  blocks and each projection is one `torch.bmm` (`_PaddedRows`): one parallel
  region instead of one per expert, which keeps its speed when other
  processes share the cores; otherwise every expert's first min(load) rows
  run as one `torch.bmm` and the rest as a grouped matmul (`_SplitRows`).
- "gmm": grouped_gemm's GPU kernel (the `gmm` extra), imported only when used.
- "te": accepted where Transformer Engine is installed; TE's grouped linear
  wants one weight module per expert, so on stacked weights it runs the
  "torch_mm" grouped GEMM (cuBLAS grouped GEMM on GPU).

Shape legend: T tokens, K top-k, E experts, L local experts (E without
expert parallelism), N routed rows grouped by expert (sum of counts_L),
R routed rows including padding (N when not padded), D expert input width,
F expert hidden width, F2 = 2F for gated activations (F for relu2).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from am_moe.config import MoEConfig, is_gated
from am_moe.dispatch import LocalDispatcher

if TYPE_CHECKING:
    from am_dtype.backend import BackendConfig

__all__ = ["ACTIVATIONS", "EXPERT_IMPLS", "GroupedExperts", "apply_activation", "run_experts"]


# ---------------------------------------------------------------------------------------------
# Activations: h_NF2 (pre-activation) -> a_NF
# ---------------------------------------------------------------------------------------------


def _halves(h_NF2: Tensor) -> tuple[Tensor, Tensor]:
    f = h_NF2.shape[-1] // 2
    return h_NF2[..., :f], h_NF2[..., f:]


def _swiglu(h_NF2: Tensor, alpha: float, limit: float) -> Tensor:
    gate, up = _halves(h_NF2)
    return F.silu(gate) * up


def _geglu(h_NF2: Tensor, alpha: float, limit: float) -> Tensor:
    # Gemma's `gelu_pytorch_tanh`.
    gate, up = _halves(h_NF2)
    return F.gelu(gate, approximate="tanh") * up


def _clamped_glu(h_NF2: Tensor, alpha: float, limit: float) -> Tensor:
    # GPT-OSS: gate clamped above, up clamped both ways, and a +1 on the up branch.
    gate, up = _halves(h_NF2)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _relu2(h_NF2: Tensor, alpha: float, limit: float) -> Tensor:
    return torch.square(F.relu(h_NF2))


# "quick_geglu" (the reference's name) and "swigluoai" (GPT-OSS's) are the same clamped
# function of (gate, up); the reference's quick_geglu read gate/up from interleaved columns,
# here every gated activation reads the gate half [:F] and the up half [F:].
ACTIVATIONS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "swiglu": _swiglu,
    "geglu": _geglu,
    "quick_geglu": _clamped_glu,
    "swigluoai": _clamped_glu,
    "relu2": _relu2,
}


def apply_activation(
    h_NF2: Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0
) -> Tensor:
    """Expert activation by name on the first projection's output (gate half first)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not supported; accepted: {list(ACTIVATIONS)}"
        )
    return ACTIVATIONS[activation](h_NF2, alpha, limit)


# Activation and a function from grad_a to grad_h sharing its intermediates (used in
# backward, after recomputing the activation). The grad function may overwrite grad_a.
ActivationWithGrad = Callable[[Tensor], tuple[Tensor, Callable[[Tensor], Tensor]]]


def _relu2_with_grad(h_NF: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    r_NF = F.relu(h_NF)
    return r_NF * r_NF, lambda grad_a: grad_a.mul_(r_NF).mul_(2)


def _swiglu_with_grad(h_NF2: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    gate, up = _halves(h_NF2)
    sig = torch.sigmoid(gate)
    silu = gate * sig

    def grad(grad_a: Tensor) -> Tensor:
        grad_h = torch.empty_like(h_NF2)
        f = gate.shape[-1]
        torch.mul(grad_a, silu, out=grad_h[:, f:])
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        dsilu = (1 - sig).mul_(gate).add_(1).mul_(sig)
        torch.mul(grad_a.mul_(up), dsilu, out=grad_h[:, :f])
        return grad_h

    return silu * up, grad


_ACTIVATIONS_WITH_GRAD: dict[str, ActivationWithGrad] = {
    "relu2": _relu2_with_grad,
    "swiglu": _swiglu_with_grad,
}


def _activation_with_grad(act: Callable[[Tensor], Tensor], name: str) -> ActivationWithGrad:
    """Closed form where we have one; otherwise differentiate a recompute of `act`."""
    if name in _ACTIVATIONS_WITH_GRAD:
        return _ACTIVATIONS_WITH_GRAD[name]

    def generic(h_NF2: Tensor):
        with torch.enable_grad():
            h = h_NF2.detach().requires_grad_(True)
            a = act(h)

        def grad(grad_a: Tensor) -> Tensor:
            (grad_h,) = torch.autograd.grad(a, h, grad_a)
            return grad_h

        return a.detach(), grad

    return generic


# ---------------------------------------------------------------------------------------------
# Grouped matmuls (rows of each group times that group's matrix)
# ---------------------------------------------------------------------------------------------


def _aligned(*tensors: Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned strides and data pointers.
    for t in tensors:
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
    """The shared workspace as seen by one fused call (knows the activation's name)."""

    act_name: str

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return _WORKSPACE.get(name, tuple(shape), like)


def _relu2_into(h_RF: Tensor, out_RF: Tensor) -> Tensor:
    torch.clamp_min(h_RF, 0, out=out_RF)
    return out_RF.mul_(out_RF)


def _mlp_forward(x_RD, rows, w_up, w_down, b_up, b_down, act, w_R=None, ws=None):
    """(y_RD, h_RF2): y = (w_R *) act(x @ w_up[g] + b_up[g]) @ w_down[g] (+ w_R *) b_down[g].

    The routing weight, when given, scales the activation (R x F) rather than the output
    (R x D): the same product, on half as many values for the usual F <= D. With a
    workspace `ws` (`_scratch`) the activation and y_RD live in its buffers (y_RD reuses
    x_RD's, which is dead once h is computed): the caller must consume y_RD before the
    next call.
    """
    h_RF2 = rows.mm(x_RD, w_up)
    if b_up is not None:
        h_RF2 += rows.per_row(b_up)
    if ws is not None and ws.act_name == "relu2":
        a_RF = _relu2_into(h_RF2, ws.get("a", h_RF2.shape, h_RF2))
    else:
        a_RF = act(h_RF2)
    if w_R is not None:
        a_RF.mul_(w_R.unsqueeze(-1))
    y_RD = rows.mm(a_RF, w_down, out=None if ws is None else x_RD)
    if b_down is not None:
        bias_RD = rows.per_row(b_down)
        y_RD += bias_RD if w_R is None else bias_RD * w_R.unsqueeze(-1)
    return y_RD, h_RF2


def _relu2_with_grad_into(h_RF: Tensor, ws: _Scratch):
    r_RF = torch.clamp_min(h_RF, 0, out=ws.get("r", h_RF.shape, h_RF))
    a_RF = torch.mul(r_RF, r_RF, out=ws.get("a", h_RF.shape, h_RF))
    return a_RF, lambda grad_a: grad_a.mul_(r_RF).mul_(2)


def _mlp_backward(ctx, g_RD, x_RD, h_RF2, rows, w_up, w_down, b_down, w_R, ws=None):
    """Gradients of `_mlp_forward` for (x, w_up, w_down, b_up, b_down, w_R), by name.

    `ctx.want` names the gradients needed; the activation is recomputed from h_RF2. With a
    workspace `ws` the R-row intermediates live in its buffers and grads["x"] reuses
    g_RD's buffer (dead by then): the caller must consume it before the next call.
    """
    want = ctx.want
    grads = dict.fromkeys(("x", "w_up", "w_down", "b_up", "b_down", "w_R"))
    if ws is not None and ctx.act_name == "relu2":
        a_RF, act_grad = _relu2_with_grad_into(h_RF2, ws)
    else:
        a_RF, act_grad = _activation_with_grad(ctx.act, ctx.act_name)(h_RF2)
    grad_a_out = None if ws is None else ws.get("grad_a", a_RF.shape, a_RF)
    if want["w_down"]:
        scaled_RF = a_RF
        if w_R is not None:
            scaled_RF = torch.mul(a_RF, w_R.unsqueeze(-1), out=grad_a_out)
        grads["w_down"] = rows.wgrad(scaled_RF, g_RD)
        del scaled_RF
    if want["b_down"]:
        grads["b_down"] = rows.segment_sum(g_RD if w_R is None else g_RD * w_R.unsqueeze(-1))
    grad_a_RF = rows.mm(g_RD, w_down.transpose(-2, -1), out=grad_a_out)
    if w_R is not None:
        if want["w_R"]:
            if ws is not None and ctx.act_name == "relu2":
                # a_RF is a workspace buffer, dead after this: no fresh R x F product.
                grads["w_R"] = a_RF.mul_(grad_a_RF).sum(-1)
            else:
                grads["w_R"] = torch.linalg.vecdot(grad_a_RF, a_RF)
            if b_down is not None:
                grads["w_R"] += torch.linalg.vecdot(g_RD, rows.per_row(b_down))
        grad_a_RF.mul_(w_R.unsqueeze(-1))
    del a_RF
    grad_h_RF2 = act_grad(grad_a_RF)
    del grad_a_RF
    if want["w_up"]:
        grads["w_up"] = rows.wgrad(x_RD, grad_h_RF2)
    if want["b_up"]:
        grads["b_up"] = rows.segment_sum(grad_h_RF2)
    if want["x"]:
        grads["x"] = rows.mm(grad_h_RF2, w_up.transpose(-2, -1), out=None if ws is None else g_RD)
    return grads


class _GroupedMLP(torch.autograd.Function):
    """Expert MLPs on rows already grouped by expert (the dispatcher contract's kernel).

    Saves x_ND and the pre-activation h_NF2 only; the activation is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x_ND, counts_L, w_up, w_down, b_up, b_down, act, act_name):
        ctx.rows = _GroupedRows(counts_L, x_ND.device)
        y_ND, h_NF2 = _mlp_forward(x_ND, ctx.rows, w_up, w_down, b_up, b_down, act)
        ctx.save_for_backward(x_ND, h_NF2, w_up, w_down, b_down)
        ctx.act, ctx.act_name = act, act_name
        need = ctx.needs_input_grad
        ctx.want = {
            "x": need[0], "w_up": need[2], "w_down": need[3],
            "b_up": need[4], "b_down": need[5], "w_R": False,
        }  # fmt: skip
        return y_ND

    @staticmethod
    def backward(ctx, grad_y_ND):
        x_ND, h_NF2, w_up, w_down, b_down = ctx.saved_tensors
        g = _mlp_backward(
            ctx, grad_y_ND.contiguous(), x_ND, h_NF2, ctx.rows, w_up, w_down, b_down, None
        )
        return g["x"], None, g["w_up"], g["w_down"], g["b_up"], g["b_down"], None, None


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
    rows: _GroupedRows | _PaddedRows
    token_rows: tuple[Tensor, Tensor] | None = None

    def sum_per_token(self, y_RD: Tensor, num_tokens: int) -> Tensor:
        """out[t] = sum of the rows of y_RD that belong to token t."""
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
        out_TD = y_RD.new_empty(num_tokens, y_RD.shape[1])
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
    indices_TK, token_mask_T, num_experts: int, layout: str, max_padding: float = 0.125
) -> _Plan:
    """Sort the (token, k) pairs by expert and lay the rows out as `layout` (on CPU)."""
    if layout not in CPU_LAYOUTS:
        raise ValueError(f"cpu_layout={layout!r} is not supported; accepted: {list(CPU_LAYOUTS)}")
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


class _LocalMoE(torch.autograd.Function):
    """Gather rows by expert, run the expert MLPs, weight and sum back per token: one op.

    The no-expert-parallelism fast path of `GroupedExperts`: it saves only the pre-activation
    h_RF2 (plus x_TD, which the caller keeps anyway) and re-gathers x rows in backward, so the
    routed copies of x and the unweighted expert outputs never stay alive between passes.
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_up, w_down, b_up, b_down, plan, act, act_name, reuse):
        w_N = weights_TK.reshape(-1).index_select(0, plan.pair_N).to(x_TD.dtype)
        w_R = w_N
        if plan.slot_N is not None:
            w_R = w_N.new_zeros(plan.src_R.numel()).index_copy_(0, plan.slot_N, w_N)
        ws = _Scratch(act_name) if reuse else None
        x_RD = _gather_rows(x_TD, plan.src_R, ws, "x")
        y_RD, h_RF2 = _mlp_forward(x_RD, plan.rows, w_up, w_down, b_up, b_down, act, w_R, ws)
        del x_RD
        out_TD = plan.sum_per_token(y_RD, x_TD.shape[0])
        ctx.save_for_backward(x_TD, h_RF2, w_R, w_up, w_down, b_down)
        ctx.plan, ctx.act, ctx.act_name, ctx.ws = plan, act, act_name, ws
        ctx.weights_meta = (weights_TK.shape, weights_TK.dtype)
        need = ctx.needs_input_grad
        ctx.want = {
            "x": need[0], "w_R": need[1], "w_up": need[2],
            "w_down": need[3], "b_up": need[4], "b_down": need[5],
        }  # fmt: skip
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        x_TD, h_RF2, w_R, w_up, w_down, b_down = ctx.saved_tensors
        plan = ctx.plan
        ws = ctx.ws
        g_RD = _gather_rows(grad_out_TD.contiguous(), plan.src_R, ws, "g")
        x_RD = _gather_rows(x_TD, plan.src_R, ws, "x")
        g = _mlp_backward(ctx, g_RD, x_RD, h_RF2, plan.rows, w_up, w_down, b_down, w_R, ws)
        del g_RD, x_RD
        grad_x = None
        if g["x"] is not None:
            grad_x = plan.sum_per_token(g["x"], x_TD.shape[0])
        grad_weights = None
        if g["w_R"] is not None:
            shape, dtype = ctx.weights_meta
            grad_w_N = g["w_R"] if plan.slot_N is None else g["w_R"].index_select(0, plan.slot_N)
            grad_weights = grad_w_N.new_zeros(shape.numel()).index_copy_(0, plan.pair_N, grad_w_N)
            grad_weights = grad_weights.view(shape).to(dtype)
        return (
            grad_x,
            grad_weights,
            g["w_up"],
            g["w_down"],
            g["b_up"],
            g["b_down"],
            None,
            None,
            None,
            None,
        )


def _gather_rows(v_TD: Tensor, src_R: Tensor, ws: _Scratch | None, name: str) -> Tensor:
    if ws is None:
        return v_TD.index_select(0, src_R)
    out_RD = ws.get(name, (src_R.numel(), v_TD.shape[1]), v_TD)
    return torch.index_select(v_TD, 0, src_R, out=out_RD)


# ---------------------------------------------------------------------------------------------
# Kernels by name
# ---------------------------------------------------------------------------------------------


def _run_loop(x_ND, counts_L, w_up, w_down, act, b_up, b_down):
    # unbind once: its backward stacks the per-expert grads in one go, where indexing w[g]
    # per expert would build (and sum) a full-size zero gradient for every expert.
    ups, downs = w_up.unbind(0), w_down.unbind(0)
    up_biases = b_up.unbind(0) if b_up is not None else None
    down_biases = b_down.unbind(0) if b_down is not None else None
    outs = []
    start = 0
    for g, n in enumerate(counts_L.tolist()):
        if n == 0:
            continue
        h = x_ND[start : start + n] @ ups[g]
        h = h if up_biases is None else h + up_biases[g]
        y = act(h) @ downs[g]
        outs.append(y if down_biases is None else y + down_biases[g])
        start += n
    if not outs:
        # Keep the graph connected so every expert parameter still receives a (zero) grad.
        params = [p for p in (w_up, w_down, b_up, b_down) if p is not None]
        return x_ND @ w_up[0, :, :0] @ w_down[0, :0, :] + 0 * sum(p.sum() for p in params)
    return torch.cat(outs)


def _run_grouped_mm(x_ND, counts_L, w_up, w_down, act, b_up, b_down, act_name):
    return _GroupedMLP.apply(x_ND, counts_L, w_up, w_down, b_up, b_down, act, act_name)


def _run_gmm(x_ND, counts_L, w_up, w_down, act, b_up, b_down):
    from am_dtype.backend import HAVE_GMM

    if not HAVE_GMM:
        raise ImportError("experts impl 'gmm' needs grouped_gemm; install the 'gmm' extra")
    from grouped_gemm import ops

    batch_sizes = counts_L.to("cpu")
    rows = _GroupedRows(counts_L, x_ND.device)
    h = ops.gmm(x_ND, w_up, batch_sizes, trans_b=False)
    h = h if b_up is None else h + rows.per_row(b_up)
    y = ops.gmm(act(h), w_down, batch_sizes, trans_b=False)
    return y if b_down is None else y + rows.per_row(b_down)


def _run_te(x_ND, counts_L, w_up, w_down, act, b_up, b_down, act_name):
    from am_dtype.backend import HAVE_TE

    if not HAVE_TE:
        raise ImportError("experts impl 'te' needs transformer_engine; install the 'te' extra")
    # TE's grouped linear keeps one weight module per expert; on stacked weights the grouped
    # GEMM it would issue is the one torch._grouped_mm issues (cuBLAS grouped GEMM on GPU).
    return _run_grouped_mm(x_ND, counts_L, w_up, w_down, act, b_up, b_down, act_name)


EXPERT_IMPLS: dict[str, Callable[..., Tensor]] = {
    "torch": _run_loop,
    "torch_mm": _run_grouped_mm,
    "gmm": _run_gmm,
    "te": _run_te,
}
# Kernels that also take the activation's name (to pick its closed-form gradient).
_NAMED_ACTIVATION_IMPLS = frozenset({"torch_mm", "te"})


def run_experts(
    x_ND: Tensor,
    counts_L: Tensor,
    w_up_LDF2: Tensor,
    w_down_LFD: Tensor,
    activation: str,
    impl: str,
    b_up_LF2: Tensor | None = None,
    b_down_LD: Tensor | None = None,
    *,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> Tensor:
    """Run each local expert's MLP on its contiguous block of rows: y_ND, rows in input order.

    `counts_L[g]` rows of `x_ND` (in order) belong to local expert g; `sum(counts_L) == N`.
    """
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"experts impl={impl!r} is not supported; accepted: {list(EXPERT_IMPLS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not supported; accepted: {list(ACTIVATIONS)}"
        )
    if counts_L.numel() != w_up_LDF2.shape[0]:
        raise ValueError(
            f"counts_L has {counts_L.numel()} groups but the weights hold {w_up_LDF2.shape[0]} experts"
        )
    act = partial(ACTIVATIONS[activation], alpha=alpha, limit=limit)
    x_ND = x_ND.to(w_up_LDF2.dtype)
    args = (x_ND, counts_L, w_up_LDF2, w_down_LFD, act, b_up_LF2, b_down_LD)
    if impl in _NAMED_ACTIVATION_IMPLS:
        return EXPERT_IMPLS[impl](*args, activation)
    return EXPERT_IMPLS[impl](*args)


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------


def _local(t: Tensor | None) -> Tensor | None:
    """The local shard of an expert-parallel DTensor (Shard(0) over EP), else the tensor."""
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


# Row layouts of the fused path on CPU: "padded" (one batched matmul over blocks padded to
# the largest load; "split" instead when that would add more than `max_padding` rows),
# "split" (batched head + grouped tail, no padding), "grouped". Measured at the benchmark
# shape (32 experts, 2 threads): all three equal on an idle machine; under load and in bf16
# (where CPU `_grouped_mm` is slow) "padded" is about 2x faster than the other two.
CPU_LAYOUTS = ("padded", "split", "grouped")
# Kernels with a fused gather -> experts -> weighted-sum path when no expert parallelism is on.
_FUSED_LOCAL_IMPLS = frozenset({"torch_mm", "te"})


class GroupedExperts(nn.Module):
    """All routed experts of one MoE block, as stacked weights run by `run_experts`.

    `dispatcher` groups token rows by expert and combines the weighted outputs;
    it is a `LocalDispatcher` until the EP parallelizer shards the weights
    (DTensor Shard(0)) and installs an all-to-all dispatcher. With the plain
    `LocalDispatcher` and a grouped-mm kernel the same contract runs fused
    (`_LocalMoE`); any other dispatcher goes through dispatch/run_experts/combine.
    """

    # How the fused single-device path lays out routed rows on CPU (see CPU_LAYOUTS).
    cpu_layout: str = "padded"
    max_padding: float = 0.125
    # Fused CPU path: keep its large transient row buffers in a per-thread workspace shared
    # by all layers (see `_Workspace`) instead of allocating them on every call.
    reuse_cpu_buffers: bool = True

    def __init__(self, config: MoEConfig, backend: BackendConfig) -> None:
        super().__init__()
        self.n_routed_experts = config.n_routed_experts
        self.expert_activation = config.expert_activation
        self.activation_alpha = config.activation_alpha
        self.activation_limit = config.activation_limit
        self.impl = backend.experts
        self.expert_bias = config.expert_bias
        e, d, f = config.n_routed_experts, config.expert_dim, config.moe_inter_dim
        h = 2 * f if is_gated(config.expert_activation) else f
        self.gate_and_up_projs = nn.Parameter(torch.empty(e, d, h, dtype=config.dtype))
        self.down_projs = nn.Parameter(torch.empty(e, f, d, dtype=config.dtype))
        if config.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(e, h, dtype=config.dtype))
            self.down_proj_bias = nn.Parameter(torch.empty(e, d, dtype=config.dtype))
        else:
            self.gate_up_proj_bias = None
            self.down_proj_bias = None
        self.dispatcher = LocalDispatcher(e)

    def forward(
        self, x_TD: Tensor, token_mask_T: Tensor, weights_TK: Tensor, indices_TK: Tensor
    ) -> Tensor:
        """y_TD[t] = sum_k weights_TK[t, k] * expert_{indices_TK[t, k]}(x_TD[t]); masked rows 0."""
        weights = [
            _local(p)
            for p in (
                self.gate_and_up_projs,
                self.down_projs,
                self.gate_up_proj_bias,
                self.down_proj_bias,
            )
        ]
        if self.impl in _FUSED_LOCAL_IMPLS and type(self.dispatcher) is LocalDispatcher:
            return self._local_fused(x_TD, token_mask_T, weights_TK, indices_TK, weights)
        x_ND, counts_L, ctx = self.dispatcher.dispatch(x_TD, weights_TK, indices_TK, token_mask_T)
        y_ND = run_experts(
            x_ND,
            counts_L,
            weights[0],
            weights[1],
            self.expert_activation,
            self.impl,
            weights[2],
            weights[3],
            alpha=self.activation_alpha,
            limit=self.activation_limit,
        )
        return self.dispatcher.combine(y_ND, ctx).to(x_TD.dtype)

    def _local_fused(self, x_TD, token_mask_T, weights_TK, indices_TK, weights) -> Tensor:
        if token_mask_T is None:
            token_mask_T = torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
        plan = _routing_plan(
            indices_TK, token_mask_T, self.n_routed_experts, self.cpu_layout, self.max_padding
        )
        act = partial(
            ACTIVATIONS[self.expert_activation],
            alpha=self.activation_alpha,
            limit=self.activation_limit,
        )
        x_TD = x_TD.to(weights[0].dtype)
        reuse = self.reuse_cpu_buffers and x_TD.device.type == "cpu"
        out = _LocalMoE.apply(x_TD, weights_TK, *weights, plan, act, self.expert_activation, reuse)
        return out

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """Normal(0, init_std) weights, zero biases (on the local shard under EP)."""
        _local(self.gate_and_up_projs).normal_(0.0, init_std)
        _local(self.down_projs).normal_(0.0, init_std)
        for bias in (self.gate_up_proj_bias, self.down_proj_bias):
            if bias is not None:
                _local(bias).zero_()
