"""The expert MLPs one expert at a time, every step of one expert's rows done back to back.

The "per_expert" CPU layout of the fused path (`_LocalMoE`): rows grouped by expert, as in
"grouped", but instead of one grouped matmul per projection over all N rows followed by
whole-tensor activation passes, each expert's block of rows goes through its up-projection,
activation, routing-weight scale and down-projection (forward), or the six steps of its
backward, before the next expert starts. One expert's block (a few hundred rows) stays in
the CPU caches between the steps, every matmul writes straight into its destination
(`torch.mm(out=)`: the activation, the weight gradient slice, the input gradient in the
dead input rows; oneDNN's products, which have no out= form, are copied there), and no
N-row intermediate other than the saved pre-activation is made. At one fp32 thread this
is the fastest layout (see `rows.CPU_LAYOUTS`). The matmuls run on `rows.matmul`
("torch" or "onednn", `am_dtype.cpu_gemm`): on CPUs where MKL lacks AVX-512 kernels oneDNN's
are about 2x faster.

The arithmetic is that of `autograd._mlp_forward` / `_mlp_backward` on each block, in the
same order, so results match the other layouts to rounding.

Shape legend: T tokens, K top-k, E experts, L local experts (E without
expert parallelism), N routed rows grouped by expert (sum of counts_L),
R routed rows including padding (N when not padded), D expert input width,
F expert hidden width, F2 = 2F for gated activations (F for relu2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from am_dtype.cpu_gemm import cpu_mm as mm
from am_moe.experts.activations import _INTO_WORKSPACE, _activation_with_grad
from am_moe.experts.rows import _lasting, _matmul_operand, _PerExpertRows

__all__: list[str] = []  # private building blocks of the expert kernels


def _activation(h_BF2: Tensor, act, act_name: str, ws) -> Tensor:
    if ws is not None and act_name in _INTO_WORKSPACE:
        return _INTO_WORKSPACE[act_name][0](h_BF2, ws)
    return act(h_BF2)


def _blocks_forward(x_RD, rows: _PerExpertRows, w_up, w_down, b_up, b_down, act, act_name, w_R, ws):
    """(y_RD, h_RF2) as `autograd._mlp_forward`, expert by expert. y_RD is written into
    x_RD's rows (each expert's input rows are dead once its h is computed). With a
    workspace `ws`, h_RF2 is on the pool's recycled storage (`pool`)."""
    h_RF2 = _lasting(ws, (x_RD.shape[0], w_up.shape[-1]), x_RD)
    y_RD = x_RD
    w_up, w_down = _matmul_operand(w_up), _matmul_operand(w_down)
    kind, native, f = rows.matmul, rows.native, w_down.shape[-2]
    for g, s, e in rows.blocks:
        h_BF2 = h_RF2[s:e]
        mm(x_RD[s:e], w_up[g], kind, out=h_BF2)
        if b_up is not None:
            h_BF2 += b_up[g]
        if native is not None:
            w_B = None if w_R is None else w_R[s:e]
            a_BF = native.forward(act_name, h_BF2, w_B, _buffer(ws, "a", (e - s, f), h_BF2))
        else:
            a_BF = _activation(h_BF2, act, act_name, ws)
            if w_R is not None:
                a_BF.mul_(w_R[s:e].unsqueeze(-1))
        y_BD = y_RD[s:e]
        mm(a_BF, w_down[g], kind, out=y_BD)
        if b_down is not None:
            y_BD += b_down[g] if w_R is None else b_down[g] * w_R[s:e].unsqueeze(-1)
    return y_RD, h_RF2


def _blocks_backward(ctx, g_RD, x_RD, h_RF2, rows, w_up, w_down, b_down, w_R, ws):
    """Gradients of `_blocks_forward` by name, as `autograd._mlp_backward` returns them.
    With a workspace `ws` the weight gradients are on the pool's recycled storage.

    grads["x"] is written into x_RD's buffer (each expert's input rows are dead once its
    weight gradient is computed): the caller must consume it before reusing that buffer.
    """
    want = ctx.want
    grads = dict.fromkeys(("x", "w_up", "w_down", "b_up", "b_down", "w_R"))
    in_workspace = ws is not None and ctx.act_name in _INTO_WORKSPACE
    if want["w_up"]:
        grads["w_up"] = _per_expert_grad(w_up, rows, ws)
    if want["w_down"]:
        grads["w_down"] = _per_expert_grad(w_down, rows, ws)
    if want["b_up"]:
        grads["b_up"] = h_RF2.new_zeros(rows.num_groups, h_RF2.shape[-1])
    if want["b_down"]:
        grads["b_down"] = g_RD.new_zeros(rows.num_groups, g_RD.shape[-1])
    want_w_R = w_R is not None and want["w_R"]
    kind = rows.matmul
    if want_w_R:
        grads["w_R"] = h_RF2.new_empty(h_RF2.shape[0])
    if rows.native is not None:
        _native_blocks_backward(ctx, grads, g_RD, x_RD, h_RF2, rows, w_up, w_down, b_down, w_R, ws)
        return grads
    for g, s, e in rows.blocks:
        x_BD, g_BD, h_BF2 = x_RD[s:e], g_RD[s:e], h_RF2[s:e]
        w_B1 = None if w_R is None else w_R[s:e].unsqueeze(-1)
        if in_workspace:
            a_BF, act_grad = _INTO_WORKSPACE[ctx.act_name][1](h_BF2, ws)
        else:
            a_BF, act_grad = _activation_with_grad(ctx.act, ctx.act_name)(h_BF2)
        grad_a_out = None if ws is None else ws.get("grad_a", a_BF.shape, a_BF)
        if want["w_down"]:
            scaled_BF = a_BF if w_B1 is None else torch.mul(a_BF, w_B1, out=grad_a_out)
            mm(scaled_BF.t(), g_BD, kind, out=grads["w_down"][g])
            del scaled_BF
        if want["b_down"]:
            grads["b_down"][g] = (g_BD if w_B1 is None else g_BD * w_B1).sum(0)
        # oneDNN has no out= form: its product is a fresh tensor, not a copy into grad_a_out.
        grad_a_BF = mm(g_BD, w_down[g].t(), kind, out=grad_a_out if kind == "torch" else None)
        if w_B1 is not None:
            if want_w_R:
                if in_workspace:
                    # a_BF is a workspace buffer, dead after this: no fresh B x F product.
                    torch.sum(a_BF.mul_(grad_a_BF), -1, out=grads["w_R"][s:e])
                else:
                    grads["w_R"][s:e] = torch.linalg.vecdot(grad_a_BF, a_BF)
                if b_down is not None:
                    grads["w_R"][s:e] += g_BD @ b_down[g]
            grad_a_BF.mul_(w_B1)
        del a_BF
        grad_h_BF2 = act_grad(grad_a_BF)
        del grad_a_BF
        _up_projection_grads(grads, want, g, x_BD, grad_h_BF2, w_up, kind)
    if want["x"]:
        grads["x"] = x_RD
    return grads


def _native_blocks_backward(ctx, grads, g_RD, x_RD, h_RF2, rows, w_up, w_down, b_down, w_R, ws):
    """The loop of `_blocks_backward` with the activation on the fused kernels (`native`):
    one kernel call per expert reads h once and gives grad_h, the routing weight's gradient
    and the weighted activation the down projection's weight gradient needs."""
    want, native, kind, name = ctx.want, rows.native, rows.matmul, ctx.act_name
    f, f2 = w_down.shape[-2], h_RF2.shape[-1]
    want_w_R = w_R is not None and want["w_R"]
    for g, s, e in rows.blocks:
        x_BD, g_BD, h_BF2 = x_RD[s:e], g_RD[s:e], h_RF2[s:e]
        w_B = None if w_R is None else w_R[s:e]
        # oneDNN has no out= form: its product is a fresh tensor, not written into the buffer.
        grad_a_out = _buffer(ws, "grad_a", (e - s, f), h_BF2) if kind == "torch" else None
        grad_a_BF = mm(g_BD, w_down[g].t(), kind, out=grad_a_out)
        scaled_BF = _buffer(ws, "a", (e - s, f), h_BF2) if want["w_down"] else None
        grad_w_B = grads["w_R"][s:e] if want_w_R else None
        grad_h_BF2 = native.backward(
            name, h_BF2, w_B, grad_a_BF, _buffer(ws, "grad_h", (e - s, f2), h_BF2), grad_w_B,
            scaled_BF,
        )  # fmt: skip
        del grad_a_BF
        if want["w_down"]:
            mm(scaled_BF.t(), g_BD, kind, out=grads["w_down"][g])
            del scaled_BF
        if want["b_down"]:
            grads["b_down"][g] = (g_BD if w_B is None else g_BD * w_B.unsqueeze(-1)).sum(0)
        if want_w_R and b_down is not None:
            grad_w_B += g_BD @ b_down[g]
        _up_projection_grads(grads, want, g, x_BD, grad_h_BF2, w_up, kind)
    if want["x"]:
        grads["x"] = x_RD


def _up_projection_grads(grads, want, g, x_BD, grad_h_BF2, w_up, kind) -> None:
    """Expert g's up-projection weight and bias gradients, and its rows' input gradient
    (written into x_BD, dead once the weight gradient is taken)."""
    if want["w_up"]:
        mm(x_BD.t(), grad_h_BF2, kind, out=grads["w_up"][g])
    if want["b_up"]:
        grads["b_up"][g] = grad_h_BF2.sum(0)
    if want["x"]:
        mm(grad_h_BF2, w_up[g].t(), kind, out=x_BD)


def _buffer(ws, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A workspace buffer (dead after the call), or a new tensor without a workspace."""
    return like.new_empty(shape) if ws is None else ws.get(name, shape, like)


def _per_expert_grad(w_LAB: Tensor, rows: _PerExpertRows, ws) -> Tensor:
    """An uninitialised contiguous gradient for w_LAB whose experts without rows are zero."""
    grad = _lasting(ws, tuple(w_LAB.shape), w_LAB)
    for g in rows.empty:
        grad[g].zero_()
    return grad
