"""fp32 CPU attention on oneDNN's GEMM: `gemm_attention`.

PyTorch's CPU flash-attention kernel runs its score and value products on MKL's sgemm in
small blocks; on the CPU this workspace is benchmarked on oneDNN's GEMM is about twice as
fast (`am_dtype.cpu_gemm`; used where `BackendConfig.cpu_gemm` resolves to "onednn"). `gemm_attention` computes softmax(q k^T * scale + mask) v
per query chunk of `CHUNK` rows with plain softmax, each chunk over only the contiguous key
range its rows may attend to (causal: keys up to the chunk's last query; a bool mask: the
ranges of `am_models_gemma4.windowed.key_ranges`), with one GEMM per (batch row, K/V head,
chunk) for each product: the query heads sharing a K/V head (GQA) are rows of one GEMM.
The backward is the standard one from the saved probabilities (dP = dO v^T, dS = P (dP -
rowsum(dO O)), dQ = dS k, dK = dS^T q, dV = P^T dO). Every row's softmax runs over the same
keys as the whole-mask kernel's, so results equal it up to fp32 summation order.

It applies to fp32 CPU tensors, self-attention (as many queries as keys), no dropout, and
either no mask (causal) or a dense bool mask [B or 1, 1, S, S] in which every query may
attend to some key; `gemm_attention` returns None otherwise, and the caller runs its kernel.

Shape legend: B batch, S queries (= keys), H query heads, G K/V heads, R = H / G query heads
per K/V head, D head dim, c rows of a chunk, n keys of a chunk's range.
"""

from __future__ import annotations

import torch
from torch import Tensor

from am_dtype.cpu_gemm import onednn_available, onednn_gemm
from am_models_gemma4.windowed import CHUNK, key_ranges

__all__ = ["gemm_attention"]

_AVAILABLE = onednn_available()
# Per mask object: whether every query row attends to some key (the rows softmax can take).
_ROWS_OK: dict[int, tuple[Tensor, bool]] = {}
_CACHE_SIZE = 4


_gemm = onednn_gemm  # x @ w.T on oneDNN (any strides)


def _rows_ok(mask: Tensor) -> bool:
    hit = _ROWS_OK.get(id(mask))
    if hit is not None and hit[0] is mask:
        return hit[1]
    ok = bool(mask.any(-1).all())
    if len(_ROWS_OK) >= _CACHE_SIZE:
        _ROWS_OK.pop(next(iter(_ROWS_OK)))
    _ROWS_OK[id(mask)] = (mask, ok)
    return ok


def _plan(q: Tensor, k: Tensor, mask: Tensor | None) -> list[tuple[int, int, int, int]] | None:
    S = q.shape[2]
    if mask is None:
        return [(q0, min(S, q0 + CHUNK), 0, min(S, q0 + CHUNK)) for q0 in range(0, S, CHUNK)]
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    if mask.shape[-2:] != (S, S) or mask.shape[0] not in (1, q.shape[0]):
        return None
    if not _rows_ok(mask):
        return None
    ranges = key_ranges(mask, CHUNK)
    if ranges is None:  # chunking saves under a fifth: the whole key range per chunk
        ranges = [(q0, min(S, q0 + CHUNK), 0, S) for q0 in range(0, S, CHUNK)]
    return ranges


def _chunk_mask(mask: Tensor | None, b: int, q0: int, q1: int, k0: int, k1: int) -> Tensor:
    """[c, 1, n] bool (True = may attend) of batch row b's chunk."""
    if mask is None:  # causal: query q sees keys <= q
        rows = torch.arange(q0, q1)[:, None]
        return (torch.arange(k0, k1)[None, :] <= rows)[:, None, :]
    return mask[b if mask.shape[0] > 1 else 0, 0, q0:q1, k0:k1][:, None, :]


class _GemmAttention(torch.autograd.Function):
    """q [B, S, G, R, D] (token-major), k/v [B, G, S, D] (dense) -> out [B, S, G, R, D]."""

    @staticmethod
    def forward(ctx, q, k, v, mask, ranges, scale):
        B, S, G, R, D = q.shape
        out = q.new_empty(B, S, G, R, D)
        probs = []
        for b in range(B):
            for g in range(G):
                for q0, q1, k0, k1 in ranges:
                    q_cRD = q[b, q0:q1, g].reshape(-1, D)
                    s = _gemm(q_cRD, k[b, g, k0:k1])  # [c*R, n]
                    if scale != 1.0:
                        s.mul_(scale)
                    s = s.view(q1 - q0, R, k1 - k0)
                    s.masked_fill_(~_chunk_mask(mask, b, q0, q1, k0, k1), float("-inf"))
                    p = torch.softmax(s, dim=-1).view(-1, k1 - k0)
                    out[b, q0:q1, g] = _gemm(p, v[b, g, k0:k1].t()).view(q1 - q0, R, D)
                    probs.append(p)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.ranges, ctx.scale = ranges, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, *probs = ctx.saved_tensors
        B, S, G, R, D = q.shape
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1)  # [B, S, G, R]: rowsum(dO * O)
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        it = iter(probs)
        for b in range(B):
            for g in range(G):
                for q0, q1, k0, k1 in ctx.ranges:
                    p = next(it)
                    do = grad_out[b, q0:q1, g].reshape(-1, D)
                    k_nD, v_nD = k[b, g, k0:k1], v[b, g, k0:k1]
                    ds = _gemm(do, v_nD)  # dP [c*R, n]
                    ds.sub_(delta[b, q0:q1, g].reshape(-1, 1)).mul_(p)
                    if ctx.scale != 1.0:
                        ds.mul_(ctx.scale)
                    dq[b, q0:q1, g] = _gemm(ds, k_nD.t()).view(q1 - q0, R, D)
                    q_cRD = q[b, q0:q1, g].reshape(-1, D)
                    dk[b, g, k0:k1] += _gemm(ds.t(), q_cRD.t())
                    dv[b, g, k0:k1] += _gemm(p.t(), do.t())
        return dq, dk, dv, None, None, None


def gemm_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_active: bool
) -> Tensor | None:
    """softmax(q k^T * scale + mask) v for q [B, H, S, D], k/v [B, G, S, D] (G divides H)
    and `mask` None (causal) or bool [B or 1, 1, S, S] (True = may attend): [B, H, S, D];
    None where it does not apply (see the module docstring)."""
    if not _AVAILABLE or dropout_active or torch.compiler.is_compiling():
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (q, k, v)):
        return None
    if any(type(t) is not Tensor for t in (q, k, v)) or q.shape[2] != k.shape[2]:
        return None
    ranges = _plan(q, k, mask)
    if ranges is None:
        return None
    B, H, S, D = q.shape
    G = k.shape[1]
    # q token-major ([B, S, H, D], as the projection produces it): a chunk's rows of one K/V
    # head are one [c*R, D] block (a view when G = 1). k/v dense per head: oneDNN's GEMM is
    # slow on operands whose rows are not densely packed.
    q_ = q.transpose(1, 2).reshape(B, S, G, H // G, D)
    out = _GemmAttention.apply(q_, k.contiguous(), v.contiguous(), mask, ranges, scale)
    return out.view(B, S, H, D).transpose(1, 2)
