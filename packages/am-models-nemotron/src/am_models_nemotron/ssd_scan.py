"""The chunked SSD scan of Mamba2 as one autograd function with a hand-written backward.

Forward and backward follow the SSD decomposition (Dao & Gu, 2024). Per chunk of L
positions, with a_cs the in-chunk cumulative sum of dt * A:
  y_intra[l] = sum_{s<=l} (C_l . B_s) exp(a_cs[l] - a_cs[s]) dt_s x_s     (quadratic term)
  state_c    = sum_s exp(a_cs[L-1] - a_cs[s]) dt_s x_s (x) B_s             (chunk's own state)
  h_{c+1}    = exp(a_cs[L-1]) h_c + state_c                               (chunk recurrence)
  y_state[l] = exp(a_cs[l]) C_l . h_c                                     (entering state)
  y = y_intra + y_state + D x
Sequence boundaries of packed rows (`seq`) zero the decay factors that cross them.

Autograd through these steps made about twice the elementwise passes of this backward
(one saved and one gradient tensor per broadcast, transposed copies for every matmul of
the backward, a full-size zero gradient per chunk of the recurrence). Here every operand
of the twelve matmuls is laid out once so each runs as a plain batched matmul, the R heads
of a B/C group share one matmul with the group's B or C, and the elementwise work of the
backward is fused into the few passes it needs.

Shapes: Bt batch, nc chunks, L chunk length, H heads, G groups, R = H // G, P head dim,
N state size, M = Bt * nc. Layouts: "head-major" [M, H, L, P]; B and C group-major
[M, G, L, N]; states [M, G, N, R * P] (the state size first, so the R heads' channels of
a group are one matmul operand).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    initial: Tensor | None,
    seq_idx: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(y [Bt, S, H, P], final state [Bt, H, P, N]); every input already in the compute dtype.

    See `ssd.ssd_chunk_scan` for the arguments.
    """
    return _ChunkScan.apply(x, dt, A, B, C, D, initial, seq_idx, chunk_size)


def _pad(t: Tensor, pad: int) -> Tensor:
    """Zeros after the last position (dim 1)."""
    return t if pad == 0 else F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def _seq_masks(seq_idx: Tensor, pad: int, nc: int, L: int, dtype: torch.dtype):
    """(keep [Bt, nc, 1, L, L] bool, to_end [Bt, nc, 1, L], from_start [Bt, nc, 1, L],
    carry [Bt, nc, 1]) for packed rows: same-sequence pairs in a chunk, positions in the
    chunk's last sequence, positions in the sequence entering the chunk, and chunks whose
    last position continues the sequence entering them."""
    if pad:  # padding continues the last sequence, so it cannot reset the final state
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
    seq = seq_idx.view(seq_idx.shape[0], nc, L)
    keep = (seq[..., :, None] == seq[..., None, :])[:, :, None]
    prev_end = torch.cat([seq[:, :1, :1], seq[:, :-1, -1:]], dim=1)  # [Bt, nc, 1]
    to_end = (seq == seq[..., -1:]).to(dtype)[:, :, None]
    from_start = (seq == prev_end).to(dtype)[:, :, None]
    carry = (seq[..., -1:] == prev_end).to(dtype)
    return keep, to_end, from_start, carry


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial, seq_idx, L):
        Bt, S, H, P = x.shape
        G, N = B.shape[-2:]
        R = H // G
        pad = (-S) % L
        nc = (S + pad) // L
        M = Bt * nc
        x, dt, B, C = _pad(x, pad), _pad(dt, pad), _pad(B, pad), _pad(C, pad)
        x5 = x.view(Bt, nc, L, H, P)
        # Per-position factors, head-major [Bt, nc, H, L] (small: no P or N axis).
        a_cs = (dt * A).view(Bt, nc, L, H).transpose(2, 3).contiguous().cumsum(-1)
        dt_h = dt.view(Bt, nc, L, H).transpose(2, 3)
        to_end = torch.exp(a_cs[..., -1:] - a_cs)
        from_start = torch.exp(a_cs)
        chunk_decay = torch.exp(a_cs[..., -1])  # [Bt, nc, H]
        keep = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if seq_idx is not None:
            keep_seq, m_end, m_start, m_carry = _seq_masks(seq_idx, pad, nc, L, x.dtype)
            keep = keep & keep_seq
            to_end, from_start = to_end * m_end, from_start * m_start
            chunk_decay = chunk_decay * m_carry
        # Group-major B and C: the operands of six matmuls, copied once.
        B_c = B.view(Bt, nc, L, G, N).transpose(2, 3).reshape(M * G, L, N)
        C_c = C.view(Bt, nc, L, G, N).transpose(2, 3).reshape(M * G, L, N)

        # Quadratic term. exp below about -87 gives float32 denormals (30x slower on CPU):
        # the clamp keeps exp on the fast path (what it cuts is < 2e-35); the dropped pairs
        # (future, other sequence) get exp(-inf) = 0.
        scores = torch.bmm(C_c, B_c.transpose(1, 2)).view(M, G, 1, L, L)
        decay = (a_cs[..., :, None] - a_cs[..., None, :]).clamp_(min=-80.0, max=0.0)
        decay = decay.masked_fill_(~keep, float("-inf")).exp_().view(M, G, R, L, L)
        weights = decay * scores  # [M, G, R, L, L]
        v = x.new_empty(Bt, nc, H, L, P)  # dt x, head-major
        torch.mul(x5.permute(0, 1, 3, 2, 4), dt_h[..., None], out=v)
        y = torch.bmm(weights.view(M * H, L, L), v.view(M * H, L, P))  # [M*H, L, P]

        # Each chunk's own final state, [M*G, N, R*P].
        dte = (dt_h * to_end).reshape(M, G, R, L).transpose(2, 3)  # [M, G, L, R]
        x_g = x5.view(M, L, G, R, P).transpose(1, 2)  # [M, G, L, R, P]
        xs = x.new_empty(M * G, L, R * P)
        torch.mul(x_g, dte[..., None], out=xs.view(M, G, L, R, P))
        states = torch.bmm(B_c.transpose(1, 2), xs).view(Bt, nc, G, N, R * P)

        # Recurrence over chunks: starts[:, c] is the state entering chunk c.
        decay_c = chunk_decay.view(Bt, nc, G, 1, R, 1)
        starts = x.new_empty(Bt, nc, G, N, R, P)
        if initial is None:
            starts[:, 0].zero_()
        else:
            starts[:, 0] = initial.view(Bt, G, R, P, N).permute(0, 1, 4, 2, 3)
        st6 = states.view(Bt, nc, G, N, R, P)
        for c in range(nc - 1):
            torch.addcmul(st6[:, c], starts[:, c], decay_c[:, c], out=starts[:, c + 1])
        final = torch.addcmul(st6[:, -1], starts[:, -1], decay_c[:, -1])  # [Bt, G, N, R, P]

        # Entering-state term, added in place to the quadratic term's output.
        out_s = torch.bmm(C_c, starts.view(M * G, N, R * P))  # [M*G, L, R*P]
        y5 = y.view(M, G, R, L, P)
        y5.addcmul_(out_s.view(M, G, L, R, P).transpose(2, 3), from_start.reshape(M, G, R, L, 1))
        # Back to [Bt, S, H, P] with the skip term in the same pass.
        y_out = y5.view(Bt, nc, H, L, P).transpose(2, 3)
        if D is not None:
            # Into a position-major buffer: left to itself addcmul would take y's head-major
            # layout and the reshape below would copy it once more.
            skip = x.new_empty(Bt, nc, L, H, P)
            y_out = torch.addcmul(y_out, x5, D[:, None], out=skip)
        y_out = y_out.reshape(Bt, nc * L, H, P)[:, :S]

        ctx.save_for_backward(
            x,
            dt,
            A,
            D,
            B_c,
            C_c,
            to_end,
            from_start,
            chunk_decay,
            decay,
            weights,
            v,
            xs,
            starts,
            out_s,
        )
        ctx.dims = (Bt, S, H, P, G, N, L, pad, nc)
        ctx.has_initial = initial is not None
        final = final.permute(0, 1, 3, 4, 2).reshape(Bt, H, P, N)
        return y_out, final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_final):
        saved = ctx.saved_tensors  # unpacked once (activation checkpointing allows no more)
        x, dt, A, D, B_c, C_c, to_end, from_start, chunk_decay, decay, weights, v = saved[:12]
        xs, starts, out_s = saved[12:]
        Bt, S, H, P, G, N, L, pad, nc = ctx.dims
        R, M = H // G, Bt * nc
        x5 = x.view(Bt, nc, L, H, P)
        if grad_y is None:
            grad_y = x.new_zeros(Bt, S, H, P)
        gy5 = _pad(grad_y, pad).view(Bt, nc, L, H, P)
        grad_D = None
        if D is not None:
            grad_D = (gy5 * x5).sum(-1).sum((0, 1, 2))  # the contiguous axis first
        gy = gy5.permute(0, 1, 3, 2, 4).contiguous().view(M, G, R, L, P)  # head-major

        # Entering-state term: out_s and starts.
        from_g = from_start.reshape(M, G, R, L, 1)
        g_out_s = x.new_empty(M * G, L, R * P)
        torch.mul(gy.transpose(2, 3), from_g.transpose(2, 3), out=g_out_s.view(M, G, L, R, P))
        # d/d a_cs of from_start * (C . h): sum_p g_out_s * out_s (g_out_s already carries the
        # from_start factor), both in the same group-major layout, so no strided read.
        g_a_cs = (g_out_s.view(M, G, L, R, P) * out_s.view(M, G, L, R, P)).sum(-1)
        g_a_cs = g_a_cs.transpose(2, 3).reshape(Bt, nc, H, L)
        g_C = torch.bmm(g_out_s, starts.view(M * G, N, R * P).transpose(1, 2))  # [M*G, L, N]
        g_starts = torch.bmm(C_c.transpose(1, 2), g_out_s).view(Bt, nc, G, N, R, P)

        # Chunk recurrence, backwards: gh[:, c] is the gradient of the state after chunk c.
        decay_c = chunk_decay.view(Bt, nc, G, 1, R, 1)
        gh = x.new_empty(Bt, nc, G, N, R, P)
        if grad_final is None:
            gh[:, -1].zero_()
        else:
            gh[:, -1] = grad_final.view(Bt, G, R, P, N).permute(0, 1, 4, 2, 3)
        for c in range(nc - 1, 0, -1):
            torch.addcmul(g_starts[:, c], gh[:, c], decay_c[:, c], out=gh[:, c - 1])
        grad_initial = None
        if ctx.has_initial:
            g0 = torch.addcmul(g_starts[:, 0], gh[:, 0], decay_c[:, 0])  # [Bt, G, N, R, P]
            grad_initial = g0.permute(0, 1, 3, 4, 2).reshape(Bt, H, P, N)
        # Summing the contiguous P axis first, then N, is about twice as fast as one
        # reduction over the two non-adjacent axes.
        g_decay_c = (gh * starts).sum(-1).sum(3).reshape(Bt, nc, H)
        g_a_cs[..., -1] += g_decay_c * chunk_decay

        # Chunk states: states = B_c^T @ xs.
        g_states = gh.view(M * G, N, R * P)
        g_xs = torch.bmm(B_c, g_states)  # [M*G, L, R*P]
        g_B = torch.bmm(xs, g_states.transpose(1, 2))  # [M*G, L, N]
        g_xs5 = g_xs.view(M, G, L, R, P)
        g_dte = (g_xs5 * x5.view(M, L, G, R, P).transpose(1, 2)).sum(-1)  # [M, G, L, R]
        g_dte = g_dte.transpose(2, 3).reshape(Bt, nc, H, L)
        dt_h = dt.view(Bt, nc, L, H).transpose(2, 3)
        g_to_end = g_dte * dt_h * to_end
        g_a_cs -= g_to_end
        g_a_cs[..., -1] += g_to_end.sum(-1)

        # Quadratic term: y = weights @ v, weights = decay * (C_c @ B_c^T).
        gy_flat = gy.view(M * H, L, P)
        g_w = torch.bmm(gy_flat, v.view(M * H, L, P).transpose(1, 2)).view(M, G, R, L, L)
        g_v = torch.bmm(weights.view(M * H, L, L).transpose(1, 2), gy_flat)  # [M*H, L, P]
        # [M, G, L, L], summed over the R heads of a group one head at a time (no [M, G, R, L, L]
        # product buffer); dropped pairs have decay 0.
        g_scores = torch.mul(g_w[:, :, 0], decay[:, :, 0])
        for r in range(1, R):
            g_scores.addcmul_(g_w[:, :, r], decay[:, :, r])
        g_seg = g_w.mul_(weights).view(Bt, nc, H, L, L)
        g_a_cs += g_seg.sum(-1) - g_seg.sum(-2)
        g_scores = g_scores.view(M * G, L, L)
        g_C = torch.baddbmm(g_C, g_scores, B_c)
        g_B = torch.baddbmm(g_B, g_scores.transpose(1, 2), C_c)

        # dt x enters through v (head-major) and xs (group-major, scaled by to_end).
        g_v5 = g_v.view(Bt, nc, H, L, P).transpose(2, 3)  # [Bt, nc, L, H, P]
        dt5 = dt.view(Bt, nc, L, H, 1)
        dte5 = (dt_h * to_end).transpose(2, 3)[..., None]  # [Bt, nc, L, H, 1]
        g_xs_l = g_xs5.transpose(1, 2).reshape(Bt, nc, L, H, P)
        grad_x = x.new_empty(Bt, nc, L, H, P)
        torch.mul(g_v5, dt5, out=grad_x)
        grad_x.addcmul_(g_xs_l, dte5)
        if D is not None:
            grad_x.addcmul_(gy5, D[:, None])
        g_dt = (g_v5 * x5).sum(-1) + (g_dte * to_end).transpose(2, 3)  # [Bt, nc, L, H]
        # a_cs = cumsum(dt * A): the gradient of dt * A is the reversed cumulative sum.
        g_a = g_a_cs.flip(-1).cumsum(-1).flip(-1).transpose(2, 3)  # [Bt, nc, L, H]
        grad_A = (g_a * dt5[..., 0]).sum((0, 1, 2))
        g_dt = g_dt.add_(g_a * A)

        def unchunk(t: Tensor) -> Tensor:  # [M*G, L, N] -> [Bt, S, G, N]
            return t.view(Bt, nc, G, L, N).transpose(2, 3).reshape(Bt, nc * L, G, N)[:, :S]

        grad_x = grad_x.view(Bt, nc * L, H, P)[:, :S]
        g_dt = g_dt.reshape(Bt, nc * L, H)[:, :S]
        return (grad_x, g_dt, grad_A, unchunk(g_B), unchunk(g_C), grad_D, grad_initial, None, None)
