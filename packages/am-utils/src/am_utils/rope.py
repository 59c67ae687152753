"""Rotary position embeddings applied to queries and keys, in one place for every model.

`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, fused=False)` takes what transformers'
rotary modules produce (`cos`, `sin` of shape [B, S, R], R <= head_dim rotated dims, halves
layout) and returns the rotated (q, k), the same numbers as transformers'
`apply_rotary_pos_emb`. With `fused=True` (a model passes `BackendConfig.rope_fusion`) the
rotation runs in Transformer Engine's fused RoPE kernel (`apply_rotary_pos_emb(t, freqs,
tensor_format="bshd", fused=True)`), which takes angles [S, 1, 1, R] instead of cos/sin:
they are recovered as atan2(sin, cos), and a batch whose rows have different positions is
rotated row by row. TE is imported on first fused use only; without it `fused=True` raises.

Layouts: unsqueeze_dim=1 for q/k [B, H, S, D], unsqueeze_dim=2 for [B, S, H, D]. With
R < D only the first R dims rotate, the rest pass through (partial rotary).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch
from torch import Tensor

__all__ = ["apply_rotary_pos_emb", "rotate_half"]

# Where TE keeps `apply_rotary_pos_emb(t, freqs, tensor_format, interleaved, fused, ...)`:
# transformer_engine 2.x first, then the 1.x location.
_TE_ROPE_MODULES = (
    "transformer_engine.pytorch.attention.rope",
    "transformer_engine.pytorch.attention",
)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    unsqueeze_dim: int = 1,
    *,
    fused: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rotate q and k by the angles whose cos/sin are given; see the module docstring.

    `position_ids` is accepted (and unused) for transformers' older positional signature.
    """
    del position_ids
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"unsqueeze_dim={unsqueeze_dim} is not supported; 1 (q/k [B, H, S, D]) or 2 "
            "(q/k [B, S, H, D])"
        )
    rot = cos.shape[-1]
    if rot > q.shape[-1] or rot % 2 or cos.shape != sin.shape:
        raise ValueError(
            f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must match and rotate an even "
            f"number of dims <= head_dim={q.shape[-1]}"
        )
    if fused:
        return _fused(q, cos, sin, unsqueeze_dim), _fused(k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return _rotate_all(x, cos, sin)
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat((_rotate_all(head, cos, sin), tail), dim=-1)


def _rotate_all(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, through `_Rotate` when cos/sin are constants (what
    rotary modules return) and broadcast to x's shape; else by autograd."""
    if (
        cos.requires_grad
        or sin.requires_grad
        or torch.broadcast_shapes(x.shape, cos.shape) != x.shape
    ):
        return x * cos + rotate_half(x) * sin
    return _Rotate.apply(x, cos, sin)


class _Rotate(torch.autograd.Function):
    """The rotation in two full-size passes each way (autograd's composition of chunk, neg,
    cat, two muls and an add runs five forward and as many backward). With halves 1, 2:

        y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
        dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        dx = grad * cos
        dx[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        dx[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return dx.to(ctx.x_dtype), None, None


def _te_installed() -> bool:
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def _te_rope() -> Any:
    if not _te_installed():
        raise ImportError(
            "apply_rotary_pos_emb(fused=True) runs Transformer Engine's fused RoPE kernel, but "
            "'transformer_engine' is not installed; install it with `pip install "
            "'am-dtype[te]'`, or pass fused=False (BackendConfig.rope_fusion=False)"
        )
    for name in _TE_ROPE_MODULES:
        try:
            fn = getattr(importlib.import_module(name), "apply_rotary_pos_emb", None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    raise ImportError(
        "the installed transformer_engine has no apply_rotary_pos_emb in "
        f"{list(_TE_ROPE_MODULES)}; pass fused=False"
    )


def _fused(x: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> Tensor:
    """TE's fused kernel on x in "bshd" layout, one call per distinct row of positions.

    transformers' rotary modules may scale cos/sin by an attention factor (cos^2 + sin^2 =
    factor^2, the same for every dim): TE rotates by the angle only, so the rotated dims are
    multiplied by that factor afterwards.
    """
    te_rope = _te_rope()
    x_bshd = x.transpose(1, 2) if unsqueeze_dim == 1 else x  # TE takes strided inputs
    # TE computes cos/sin of the angles in float32 itself.
    angles_BSR = torch.atan2(sin.float(), cos.float())
    scale_BS1 = torch.hypot(cos[..., :1].float(), sin[..., :1].float()).to(x.dtype)
    per_row = angles_BSR.shape[0] > 1
    rows = []
    for b in range(x_bshd.shape[0] if per_row else 1):
        freqs = angles_BSR[b if per_row else 0][:, None, None, :]
        part = x_bshd[b : b + 1] if per_row else x_bshd
        rows.append(te_rope(part, freqs, tensor_format="bshd", fused=True))
    out = rows[0] if len(rows) == 1 else torch.cat(rows)
    rot = cos.shape[-1]
    scale = scale_BS1.unsqueeze(2)  # [B, S, 1, 1] against bshd
    if rot == x.shape[-1]:
        out = out * scale
    else:
        out = torch.cat((out[..., :rot] * scale, out[..., rot:]), dim=-1)
    return out.transpose(1, 2) if unsqueeze_dim == 1 else out
