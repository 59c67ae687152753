"""Pure-PyTorch Mamba2 kernels: causal depthwise conv, chunked SSD scan, decode steps, gated norm.

These are the CPU default of `Mamba2Mixer` and the reference its GPU kernel
path is tested against. All math is float32. Every piece has a hand-written
backward, because autograd's generic ones dominate CPU time: the depthwise conv
(F.conv1d's depthwise weight gradient is several times slower than shifted
products; without packing the backward runs in cache-sized blocks), the chunked
scan (`ssd_scan.py`: one function for the whole scan, about half the elementwise
passes and none of the transposed copies autograd made) and the gated RMSNorm.

Shape legend: Bt batch, S sequence, H SSM heads, P head dim, G B/C groups,
R = H // G heads per group, N state size, L chunk length, K conv width,
Ch conv channels. Head h reads group h // R (as `repeat_interleave` would).

The scan follows the SSD decomposition of Mamba2 (Dao & Gu, 2024): per chunk
an attention-like quadratic term with a decay mask, per chunk a final state,
a short recurrence over chunk states, and the state-to-output term. Sequence
boundaries of packed rows (`seq_idx`) zero every decay that crosses them, so
no conv or SSM state leaks from one packed sequence into the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from am_models_nemotron.ssd_scan import chunk_scan


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for every input dtype except float64 (kept, for gradcheck-grade tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- conv


def conv_shift_masks(seq_idx: Tensor | None, width: int, dtype: torch.dtype) -> Tensor | None:
    """[K-1, Bt, S, 1] masks: entry j-1 is 1 where position t and t-j belong to one sequence."""
    if seq_idx is None:
        return None
    masks = torch.zeros(width - 1, *seq_idx.shape, 1, dtype=dtype, device=seq_idx.device)
    for j in range(1, width):
        masks[j - 1, :, j:, 0] = (seq_idx[:, j:] == seq_idx[:, :-j]).to(dtype)
    return masks


class _CausalConvSiLU(torch.autograd.Function):
    """silu(depthwise causal conv) over [Bt, S, Ch] with taps w_KC [K, Ch] (contiguous rows).

    Each tap is one fused multiply-add over the sequence shifted by K-1-k positions;
    broadcasting a contiguous [Ch] row keeps these vectorized.
    """

    @staticmethod
    def forward(ctx, x, w_KC, bias, shift_masks):
        if shift_masks is None:
            # Unpacked rows save no pre-activation: the blocked backward recomputes each
            # block of it (K fused multiply-adds on rows it reads anyway) while the block is
            # in cache, instead of one [Bt, S, Ch] write here and one read there.
            out = _conv_forward_blocked(x, w_KC, bias)
            ctx.save_for_backward(x, w_KC, bias)
        else:
            pre = _conv_shifted(x, w_KC, bias, shift_masks)
            out = F.silu(pre)
            ctx.save_for_backward(x, w_KC, pre, shift_masks)
        ctx.has_bias = bias is not None
        ctx.packed = shift_masks is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if not ctx.packed:
            x, w_KC, bias = ctx.saved_tensors
            grad_x, grad_w, grad_b = _conv_backward_blocked(grad_out, x, w_KC, bias)
            return grad_x, grad_w, grad_b if ctx.has_bias else None, None
        x, w_KC, pre, masks = ctx.saved_tensors
        width = w_KC.shape[0]
        grad_pre = torch.ops.aten.silu_backward(grad_out.contiguous(), pre)
        grad_x = grad_pre * w_KC[width - 1]
        for j in range(1, width):
            grad_x[:, :-j].addcmul_(grad_pre[:, j:] * masks[j - 1, :, j:], w_KC[width - 1 - j])
        grad_w = _conv_weight_grad_masked(grad_pre, x, masks)
        grad_b = grad_pre.sum((0, 1)) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


_BLOCK = 64


def _conv_backward_blocked(
    grad_out: Tensor, x: Tensor, w_KC: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad w_KC, grad bias) of silu(causal depthwise conv), in cache-sized blocks.

    Per block of positions: the pre-activation (recomputed, `_conv_block`), the SiLU
    gradient, its scatter to the K shifted input positions, and all K weight-gradient taps
    (the K shifted windows of x are one strided view) are computed while the block is in
    cache; done tap by tap over the whole sequence these were a dozen memory-bound passes. grad w_KC[k] sums
    grad_pre[t] * x[t - (K-1-k)]; the first K-1 positions, whose windows reach
    before 0, are summed separately (no padded copy of x).
    """
    Bt, S, Ch = x.shape
    K = w_KC.shape[0]
    st, sc = x.stride(1), x.stride(2)  # x is often a column slice of in_proj's output
    head = min(K - 1, S)
    T = min(_BLOCK, S)
    starts = range(0, S, T)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    parts_w = x.new_zeros(Bt * len(starts), K, Ch)
    parts_b = x.new_empty(Bt * len(starts), Ch)
    gp_buf, prod_buf = x.new_empty(T, Ch), x.new_empty(K, T, Ch)
    i = 0
    for b in range(Bt):
        for t0 in starts:
            n = min(T, S - t0)
            # The SiLU gradient overwrites the block's pre-activation (an elementwise op
            # whose output is exactly its input), so one block buffer serves both.
            pre = _conv_block(x, w_KC, bias, b, t0, t0 + n, gp_buf[:n])
            gp = torch.ops.aten.silu_backward.grad_input(
                grad_out[b, t0 : t0 + n], pre, grad_input=pre
            )
            torch.mul(gp, w_KC[K - 1], out=grad_x[b, t0 : t0 + n])
            for j in range(1, K):  # position t feeds the output at t + j through tap K-1-j
                lo = max(t0 - j, 0)
                if t0 + n - j > lo:
                    grad_x[b, lo : t0 + n - j].addcmul_(gp[lo + j - t0 :], w_KC[K - 1 - j])
            torch.sum(gp, 0, out=parts_b[i])
            first = head if t0 == 0 else 0
            if n > first:
                win = x[b, t0 + first - K + 1 :].as_strided((K, n - first, Ch), (st, st, sc))
                prod = torch.mul(win, gp[first:], out=prod_buf[:, : n - first])
                torch.sum(prod, 1, out=parts_w[i])
            for j in range(head if t0 == 0 else 0):  # t < K-1: tap K-1-j reads x[t-j], t >= j
                parts_w[i, K - 1 - j] += (gp[j:head] * x[b, : head - j]).sum(0)
            i += 1
    return grad_x, parts_w.sum(0), parts_b.sum(0)


def _conv_block(
    x: Tensor, w_KC: Tensor, bias: Tensor | None, b: int, t0: int, t1: int, blk: Tensor
) -> Tensor:
    """The conv's pre-activation at positions [t0, t1) of sequence b, written into blk."""
    K = w_KC.shape[0]
    if bias is None:
        torch.mul(x[b, t0:t1], w_KC[K - 1], out=blk)
    else:
        torch.addcmul(bias, x[b, t0:t1], w_KC[K - 1], out=blk)
    for j in range(1, K):  # output t reads x[t - j] through tap K-1-j
        lo = max(t0, j)
        if t1 > lo:
            blk[lo - t0 :].addcmul_(x[b, lo - j : t1 - j], w_KC[K - 1 - j])
    return blk


def _conv_forward_blocked(x: Tensor, w_KC: Tensor, bias: Tensor | None) -> Tensor:
    """silu of the causal depthwise conv, all K taps per cache-sized block.

    Tap by tap over the whole sequence each of the K + 1 passes streams [Bt, S, Ch] through
    memory; per block of positions the taps and the SiLU reuse what is already in cache.
    The pre-activation lives in one block-sized buffer only (the backward recomputes it).
    """
    Bt, S, Ch = x.shape
    T = min(_BLOCK, S)
    out = torch.empty(Bt, S, Ch, dtype=x.dtype, device=x.device)
    buf = x.new_empty(T, Ch)
    for b in range(Bt):
        for t0 in range(0, S, T):
            t1 = min(t0 + T, S)
            blk = _conv_block(x, w_KC, bias, b, t0, t1, buf[: t1 - t0])
            torch.ops.aten.silu.out(blk, out=out[b, t0:t1])
    return out


def _conv_weight_grad_masked(grad_pre: Tensor, x: Tensor, masks: Tensor) -> Tensor:
    width = masks.shape[0] + 1
    grad_w = x.new_empty(width, x.shape[-1])
    prod = torch.mul(grad_pre, x)  # reused as the product buffer of every tap
    grad_w[width - 1] = prod.sum((0, 1))
    for j in range(1, width):
        g = torch.mul(grad_pre[:, j:], masks[j - 1, :, j:], out=prod[:, j:])
        torch.mul(g, x[:, :-j], out=prod[:, j:])
        prod[:, :j].zero_()
        # Summing the whole contiguous buffer is far faster than summing a sliced view.
        grad_w[width - 1 - j] = prod.sum((0, 1))
    return grad_w


def _conv_shifted(x: Tensor, w_KC: Tensor, bias: Tensor | None, masks: Tensor | None) -> Tensor:
    width = w_KC.shape[0]
    out = x * w_KC[width - 1] if bias is None else torch.addcmul(bias, x, w_KC[width - 1])
    for j in range(1, width):
        src = x[:, :-j] if masks is None else x[:, :-j] * masks[j - 1, :, j:]
        out[:, j:].addcmul_(src, w_KC[width - 1 - j])
    return out


def causal_conv1d_silu(
    x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None = None
) -> Tensor:
    """silu(causal depthwise conv1d(x)) in float32 (float64 stays) for x [Bt, S, Ch], w [Ch, K].

    Positions before 0 are zeros. With `seq_idx` [Bt, S] a position only sees
    earlier positions of its own sequence.
    """
    dtype = compute_dtype(x)
    masks = conv_shift_masks(seq_idx, weight.shape[1], dtype)
    w_KC = weight.to(dtype).t().contiguous()
    bias = None if bias is None else bias.to(dtype)
    return _CausalConvSiLU.apply(x.to(dtype), w_KC, bias, masks)


def conv_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One decode step: shift x [Bt, Ch] into conv_state [Bt, Ch, K] in place.

    Returns silu(conv) over the updated window, in float32.
    """
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = (conv_state.float() * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return F.silu(out)


# --------------------------------------------------------------------------- scan


def ssd_chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan in float32. Returns (y [Bt, S, H, P], final state [Bt, H, P, N]).

    x [Bt, S, H, P]; dt [Bt, S, H] already discretized (softplus, clamp, padding zeroed);
    A [H] (negative); B, C [Bt, S, G, N]; D [H] skip; initial_state [Bt, H, P, N] is the
    state before position 0 and belongs to the sequence of position 0; seq_idx [Bt, S]
    (non-decreasing per row) resets the state at each change.
    """
    H, G = x.shape[2], B.shape[2]
    if H % G:
        raise ValueError(f"{H} heads are not divisible into {G} B/C groups")
    cdt = compute_dtype(x)
    D = None if D is None else D.to(cdt)
    initial = None if initial_state is None else initial_state.to(cdt)
    return chunk_scan(
        x.to(cdt), dt.to(cdt), A.to(cdt), B.to(cdt), C.to(cdt), chunk_size, D, initial, seq_idx
    )


def ssd_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None
) -> Tensor:
    """One recurrent step, updating state [Bt, H, P, N] in place; returns y [Bt, H, P] in fp32.

    x [Bt, H, P]; dt [Bt, H] discretized; B, C [Bt, G, N].
    """
    Bt, H, P, N = state.shape
    G = B.shape[1]
    x32, dt = x.float(), dt.float()
    decay = torch.exp(dt * A.float())[..., None, None]
    B_h = B.float()[:, :, None, None, :].expand(Bt, G, H // G, 1, N).reshape(Bt, H, 1, N)
    new = state.float() * decay + (x32 * dt[..., None])[..., None] * B_h
    state.copy_(new)
    C_h = C.float()[:, :, None, :, None].expand(Bt, G, H // G, N, 1).reshape(Bt, H, N, 1)
    y = (new @ C_h).squeeze(-1)
    if D is not None:
        y = y + x32 * D.float()[:, None]
    return y


# --------------------------------------------------------------------------- norm


def gated_rms_norm(y: Tensor, gate: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """weight * rmsnorm_per_group(y * silu(gate)) in float32 (Mamba2's norm_before_gate=False).

    y, gate [..., D] with D a multiple of group_size; returns float32 [..., D].
    """
    cdt = compute_dtype(y)
    # gate is usually a column slice of in_proj's output; silu on a strided view is ~5x slower.
    gate = gate.to(cdt).contiguous()
    return _GatedRMSNorm.apply(y.to(cdt), gate, weight.to(cdt), group_size, eps)


class _GatedRMSNorm(torch.autograd.Function):
    """Fused forward/backward of the gated group RMSNorm (about half autograd's passes)."""

    @staticmethod
    def forward(ctx, y, gate, weight, group_size, eps):
        h = torch.mul(y, F.silu(gate)).unflatten(-1, (-1, group_size))
        inv_rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
        normed = h.mul_(inv_rms).flatten(-2)
        ctx.save_for_backward(y, gate, weight, normed, inv_rms)
        ctx.group_size = group_size
        return normed * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, gate, weight, normed, inv_rms = ctx.saved_tensors
        gs = ctx.group_size
        buf = torch.mul(grad_out, normed)
        grad_w = buf.sum(tuple(range(buf.dim() - 1)))
        grad_n = grad_out * weight
        dot = torch.mul(grad_n, normed, out=buf).unflatten(-1, (-1, gs)).mean(-1, keepdim=True)
        grad_h = grad_n.unflatten(-1, (-1, gs)).addcmul_(
            normed.unflatten(-1, (-1, gs)), dot, value=-1
        )
        grad_h = grad_h.mul_(inv_rms).flatten(-2)
        grad_y = grad_h * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_h.mul_(y), gate)
        return grad_y, grad_gate, grad_w, None, None
