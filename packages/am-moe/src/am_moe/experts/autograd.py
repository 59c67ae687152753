"""The custom autograd functions that run the expert MLPs.

`_GroupedMLP` runs them on rows a dispatcher already grouped by expert; `_LocalMoE` (no
expert parallelism) fuses gather -> experts -> weighted sum per token into one node. Both
save only the inputs and the pre-activation h and recompute the activation in backward
(`_mlp_forward` / `_mlp_backward`).

Shape legend: T tokens, K top-k, E experts, L local experts (E without
expert parallelism), N routed rows grouped by expert (sum of counts_L),
R routed rows including padding (N when not padded), D expert input width,
F expert hidden width, F2 = 2F for gated activations (F for relu2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from am_moe.experts.activations import _INTO_WORKSPACE, _activation_with_grad
from am_moe.experts.blocks import _blocks_backward, _blocks_forward
from am_moe.experts.rows import _GroupedRows, _matmul_operand, _PerExpertRows, _Scratch


def _mlp_forward(x_RD, rows, w_up, w_down, b_up, b_down, act, w_R=None, ws=None):
    """(y_RD, h_RF2): y = (w_R *) act(x @ w_up[g] + b_up[g]) @ w_down[g] (+ w_R *) b_down[g].

    The routing weight, when given, scales the activation (R x F) rather than the output
    (R x D): the same product, on half as many values for the usual F <= D. With a
    workspace `ws` (`_scratch`) the activation and y_RD live in its buffers (y_RD reuses
    x_RD's, which is dead once h is computed): the caller must consume y_RD before the
    next call.
    """
    h_RF2 = rows.mm(x_RD, _matmul_operand(w_up))
    if b_up is not None:
        h_RF2 += rows.per_row(b_up)
    if ws is not None and ws.act_name in _INTO_WORKSPACE:
        a_RF = _INTO_WORKSPACE[ws.act_name][0](h_RF2, ws)
    else:
        a_RF = act(h_RF2)
    if w_R is not None:
        a_RF.mul_(w_R.unsqueeze(-1))
    y_RD = rows.mm(a_RF, _matmul_operand(w_down), out=None if ws is None else x_RD)
    if b_down is not None:
        bias_RD = rows.per_row(b_down)
        y_RD += bias_RD if w_R is None else bias_RD * w_R.unsqueeze(-1)
    return y_RD, h_RF2


def _mlp_backward(ctx, g_RD, x_RD, h_RF2, rows, w_up, w_down, b_down, w_R, ws=None):
    """Gradients of `_mlp_forward` for (x, w_up, w_down, b_up, b_down, w_R), by name.

    `ctx.want` names the gradients needed; the activation is recomputed from h_RF2. With a
    workspace `ws` the R-row intermediates live in its buffers and grads["x"] reuses
    g_RD's buffer (dead by then): the caller must consume it before the next call.
    """
    want = ctx.want
    grads = dict.fromkeys(("x", "w_up", "w_down", "b_up", "b_down", "w_R"))
    in_workspace = ws is not None and ctx.act_name in _INTO_WORKSPACE
    if in_workspace:
        a_RF, act_grad = _INTO_WORKSPACE[ctx.act_name][1](h_RF2, ws)
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
            if in_workspace:
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
        x_RD = _gather_rows(x_TD, plan, ws, "x")
        if isinstance(plan.rows, _PerExpertRows):
            y_RD, h_RF2 = _blocks_forward(
                x_RD, plan.rows, w_up, w_down, b_up, b_down, act, act_name, w_R, ws
            )
        else:
            y_RD, h_RF2 = _mlp_forward(x_RD, plan.rows, w_up, w_down, b_up, b_down, act, w_R, ws)
        del x_RD
        out_TD = plan.sum_per_token(y_RD, x_TD.shape[0], ws)
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
        g_RD = _gather_rows(grad_out_TD.contiguous(), plan, ws, "g")
        x_RD = _gather_rows(x_TD, plan, ws, "x")
        backward = _blocks_backward if isinstance(plan.rows, _PerExpertRows) else _mlp_backward
        g = backward(ctx, g_RD, x_RD, h_RF2, plan.rows, w_up, w_down, b_down, w_R, ws)
        del g_RD, x_RD
        grad_x = None
        if g["x"] is not None:
            grad_x = plan.sum_per_token(g["x"], x_TD.shape[0], ws)
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


def _gather_rows(v_TD: Tensor, plan, ws: _Scratch | None, name: str) -> Tensor:
    """v_TD's rows in the plan's routed order (`plan.src_R`), into the workspace buffer
    `name` when there is a workspace; on the native kernels' gather where the loop runs them."""
    src_R = plan.src_R
    if ws is None:
        return v_TD.index_select(0, src_R)
    out_RD = ws.get(name, (src_R.numel(), v_TD.shape[1]), v_TD)
    native = getattr(plan.rows, "native", None)
    if (
        native is not None
        and v_TD.dtype == torch.float32
        and v_TD.device.type == "cpu"
        and (v_TD.shape[1] <= 1 or v_TD.stride(1) == 1)  # the gather reads whole rows
    ):
        return native.gather_rows(v_TD, src_R, out_RD)
    return torch.index_select(v_TD, 0, src_R, out=out_RD)
