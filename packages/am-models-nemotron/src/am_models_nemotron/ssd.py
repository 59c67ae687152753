"""Pure-PyTorch Mamba2 kernels: causal depthwise conv, chunked SSD scan, decode steps, gated norm.

These are the CPU default of `Mamba2Mixer` and the reference its GPU kernel
path is tested against. All math is float32. Three pieces have hand-written
backwards because autograd's generic ones dominate CPU time: the depthwise
conv (F.conv1d's depthwise weight gradient is several times slower than shifted
products; without packing the backward runs in cache-sized blocks), the decay-masked in-chunk product (autograd makes about
twice the passes over the [.., H, L, L] tensors) and the gated RMSNorm. The
rest (chunk states, the chunk recurrence, state outputs) is plain autograd.

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
            pre, out = _conv_forward_blocked(x, w_KC, bias)
        else:
            pre = _conv_shifted(x, w_KC, bias, shift_masks)
            out = F.silu(pre)
        ctx.save_for_backward(x, w_KC, pre, shift_masks)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_KC, pre, masks = ctx.saved_tensors
        if masks is None:
            grad_x, grad_w, grad_b = _conv_backward_blocked(grad_out, x, w_KC, pre)
            return grad_x, grad_w, grad_b if ctx.has_bias else None, None
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
    grad_out: Tensor, x: Tensor, w_KC: Tensor, pre: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad w_KC, grad bias) of silu(causal depthwise conv), in cache-sized blocks.

    Per block of positions: the SiLU gradient, its scatter to the K shifted input
    positions, and all K weight-gradient taps (the K shifted windows of x are one
    strided view) are computed while the block is in cache; done tap by tap over the
    whole sequence these were a dozen memory-bound passes. grad w_KC[k] sums
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
            gp = torch.ops.aten.silu_backward.grad_input(
                grad_out[b, t0 : t0 + n], pre[b, t0 : t0 + n], grad_input=gp_buf[:n]
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


def _conv_forward_blocked(x: Tensor, w_KC: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(pre-activation, silu) of the causal depthwise conv, all K taps per cache-sized block.

    Tap by tap over the whole sequence each of the K + 1 passes streams [Bt, S, Ch] through
    memory; per block of positions the taps and the SiLU reuse what is already in cache.
    """
    Bt, S, Ch = x.shape
    K = w_KC.shape[0]
    T = min(_BLOCK, S)
    pre = torch.empty(Bt, S, Ch, dtype=x.dtype, device=x.device)
    out = torch.empty_like(pre)
    for b in range(Bt):
        for t0 in range(0, S, T):
            t1 = min(t0 + T, S)
            blk = pre[b, t0:t1]
            if bias is None:
                torch.mul(x[b, t0:t1], w_KC[K - 1], out=blk)
            else:
                torch.addcmul(bias, x[b, t0:t1], w_KC[K - 1], out=blk)
            for j in range(1, K):  # output t reads x[t - j] through tap K-1-j
                lo = max(t0, j)
                if t1 > lo:
                    blk[lo - t0 :].addcmul_(x[b, lo - j : t1 - j], w_KC[K - 1 - j])
            torch.ops.aten.silu.out(blk, out=out[b, t0:t1])
    return pre, out


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
    Bt, S, H, P = x.shape
    G, N = B.shape[-2:]
    if H % G:
        raise ValueError(f"{H} heads are not divisible into {G} B/C groups")
    L = chunk_size
    pad = (-S) % L
    nc = (S + pad) // L
    cdt = compute_dtype(x)
    x32, dt = x.to(cdt), dt.to(cdt)
    xdt = _pad_seq(x32 * dt[..., None], pad).view(Bt, nc, L, H, P)
    a_cs = _pad_seq(dt * A.to(cdt), pad).view(Bt, nc, L, H).transpose(2, 3).cumsum(-1)
    # Group-major copies once, instead of one hidden copy inside every matmul that reads them.
    B_c = _pad_seq(B.to(cdt), pad).view(Bt, nc, L, G, N).transpose(2, 3).contiguous()
    C_c = _pad_seq(C.to(cdt), pad).view(Bt, nc, L, G, N).transpose(2, 3).contiguous()
    seq = None if seq_idx is None else _pad_seq_idx(seq_idx, pad).view(Bt, nc, L)

    y = _intra_chunk(xdt, a_cs, B_c, C_c, seq)
    states = _chunk_states(xdt, a_cs, B_c, seq)
    initial = None if initial_state is None else _state_to_gnrp(initial_state.to(cdt), G)
    starts, final = _pass_states(states, a_cs[..., -1], initial, seq, x32.new_zeros)
    y = _add_state_outputs(y, starts, a_cs, C_c, seq)
    final = _state_from_gnrp(final, P)
    y = y.permute(0, 1, 3, 2, 4).reshape(Bt, nc * L, H, P)[:, :S]
    if D is not None:
        y = torch.addcmul(y, x32, D.to(cdt)[:, None])
    return y, final


def _pad_seq(t: Tensor, pad: int) -> Tensor:
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def _pad_seq_idx(seq_idx: Tensor, pad: int) -> Tensor:
    # Padding continues the last sequence so it cannot reset the final state (its dt is 0).
    if pad == 0:
        return seq_idx
    return torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)


def _intra_chunk(xdt: Tensor, a_cs: Tensor, B_c: Tensor, C_c: Tensor, seq: Tensor | None) -> Tensor:
    """Quadratic in-chunk term: y[l] = sum_{s<=l} (C_l . B_s) exp(a_cs[l] - a_cs[s]) xdt[s]."""
    L = a_cs.shape[-1]
    keep = torch.ones(L, L, dtype=torch.bool, device=a_cs.device).tril()
    if seq is not None:
        keep = keep & (seq[..., :, None] == seq[..., None, :])[:, :, None]
    scores = C_c @ B_c.transpose(-1, -2)  # [Bt, nc, G, L, L]
    # Head-major values: both matmuls of the backward read them, and a strided operand runs
    # them at about half speed on CPU.
    v = xdt.transpose(2, 3).contiguous()
    return _DecayedAttention.apply(scores, a_cs, v, ~keep)


class _DecayedAttention(torch.autograd.Function):
    """y = (exp(segsum(a_cs)) * masked scores) @ v with a hand-written backward.

    scores [Bt, nc, G, L, L] is shared by the R heads of a group; a_cs [Bt, nc, H, L];
    v [Bt, nc, H, L, P]; drop marks the (future or other-sequence) pairs to zero.
    Autograd through the elementwise chain makes about twice as many passes over
    the [Bt, nc, H, L, L] tensors as this backward does.
    """

    @staticmethod
    def forward(ctx, scores, a_cs, v, drop):
        Bt, nc, H, L = a_cs.shape
        G = scores.shape[2]
        # exp of arguments below about -87 yields float32 denormals, which run 30x slower on
        # CPU than normal exp. Clamping to [-80, 0] keeps exp on the fast path: the clamped
        # decays are < 2e-35 (nothing at float32 precision) and every entry above the
        # diagonal or across sequences is zeroed through the masked scores, not through exp.
        decay = (a_cs[..., :, None] - a_cs[..., None, :]).clamp_(min=-80.0, max=0.0).exp_()
        scores = scores.masked_fill(drop, 0.0)
        weights = (decay.view(Bt, nc, G, H // G, L, L) * scores[:, :, :, None]).view(decay.shape)
        ctx.save_for_backward(decay, weights, v, drop)
        ctx.groups = G
        return weights @ v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        decay, weights, v, drop = ctx.saved_tensors
        Bt, nc, H, L, _ = decay.shape
        G = ctx.groups
        grad_w = grad_y @ v.transpose(-1, -2)
        grad_v = weights.transpose(-1, -2) @ grad_y
        grad_scores = (grad_w * decay).view(Bt, nc, G, H // G, L, L).sum(3).masked_fill_(drop, 0.0)
        grad_seg = grad_w.mul_(weights)  # d weights / d segsum = weights (0 where dropped)
        grad_a = grad_seg.sum(-1) - grad_seg.sum(-2)
        return grad_scores, grad_a, grad_v, None


def _state_to_gnrp(state: Tensor, G: int) -> Tensor:
    """[Bt, H, P, N] -> the scan's state layout [Bt, G, N, R * P]."""
    Bt, H, P, N = state.shape
    return state.view(Bt, G, H // G, P, N).permute(0, 1, 4, 2, 3).reshape(Bt, G, N, -1)


def _state_from_gnrp(state: Tensor, P: int) -> Tensor:
    """The scan's state layout [Bt, G, N, R * P] -> [Bt, H, P, N]."""
    Bt, G, N, RP = state.shape
    return state.view(Bt, G, N, RP // P, P).permute(0, 1, 3, 4, 2).reshape(Bt, -1, P, N)


def _chunk_states(xdt: Tensor, a_cs: Tensor, B_c: Tensor, seq: Tensor | None) -> Tensor:
    """State at each chunk's end from its own tokens only, as [Bt, nc, G, N, R*P].

    States are kept transposed (state size before the R heads' P channels of a group) so the
    three matmuls that touch them (here, and C @ state in `_add_state_outputs`) read every
    operand in place, without transposed copies forward or backward.
    """
    Bt, nc, L, H, P = xdt.shape
    G = B_c.shape[2]
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # [Bt, nc, H, L]
    if seq is not None:
        to_end = to_end * (seq == seq[..., -1:]).to(to_end.dtype)[:, :, None]
    R = H // G
    xs = xdt.view(Bt, nc, L, G, R, P).transpose(2, 3) * to_end.view(Bt, nc, G, R, L).transpose(
        3, 4
    ).unsqueeze(-1)  # [Bt, nc, G, L, R, P]
    return B_c.transpose(-1, -2) @ xs.contiguous().view(Bt, nc, G, L, R * P)


def _pass_states(
    states: Tensor, chunk_decay_log: Tensor, initial: Tensor | None, seq: Tensor | None, zeros
) -> tuple[Tensor, Tensor]:
    """Recurrence over chunks: (state entering each chunk [Bt, nc, G, N, R*P], final state)."""
    Bt, nc, G, N, RP = states.shape
    H = chunk_decay_log.shape[-1]
    decay = torch.exp(chunk_decay_log)  # [Bt, nc, H]
    if seq is not None:
        prev_end = torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)
        decay = decay * (seq[..., -1] == prev_end).to(decay.dtype)[..., None]
    decay = decay.view(Bt, nc, G, 1, H // G, 1).expand(-1, -1, -1, -1, -1, RP * G // H)
    decay = decay.reshape(Bt, nc, G, 1, RP)
    h = zeros(Bt, G, N, RP) if initial is None else initial.to(states.dtype)
    starts = []
    # unbind, not states[:, c]: each indexing backward would allocate a full-size zero gradient.
    for state_c, decay_c in zip(states.unbind(1), decay.unbind(1), strict=True):
        starts.append(h)
        h = torch.addcmul(state_c, h, decay_c)
    return torch.stack(starts, dim=1), h


def _add_state_outputs(
    y: Tensor, starts: Tensor, a_cs: Tensor, C_c: Tensor, seq: Tensor | None
) -> Tensor:
    """Add each chunk's entering-state term exp(a_cs[l]) C_l . h_start to y [Bt, nc, H, L, P]."""
    Bt, nc, G, N, RP = starts.shape
    H, L = a_cs.shape[2], a_cs.shape[3]
    R, P = H // G, RP * G // H
    from_start = torch.exp(a_cs)  # [Bt, nc, H, L]
    if seq is not None:
        prev_end = torch.cat([seq[:, :1, :1], seq[:, :-1, -1:]], dim=1)
        from_start = from_start * (seq == prev_end).to(from_start.dtype)[:, :, None]
    # The R heads of a group share C: one [L, N] @ [N, R*P] product per group, no broadcasting.
    out = C_c @ starts  # [Bt, nc, G, L, R*P]
    out = out.view(Bt, nc, G, L, R, P).transpose(3, 4)
    # In place on y: one fused pass, no [Bt, nc, H, L, P] temporary.
    return (
        y.view(Bt, nc, G, R, L, P).addcmul_(out, from_start.view(Bt, nc, G, R, L, 1)).view(y.shape)
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
