"""A pure-PyTorch stand-in for Transformer Engine, for tests on machines without TE or CUDA.

Every `am` package has TE code paths (`BackendConfig(attn="te", linear="te", rms_norm="te",
rope_fusion=True, te_fp8=...)`) that CPU CI cannot run for real. This module installs, for the
duration of a test, a fake `transformer_engine` package written from TE's documented
contracts, doing the math in plain PyTorch and recording what it was handed:

- `pytorch.Linear(in_features, out_features, bias, device, params_dtype)` (parameters
  `weight` [out, in] and `bias`, not an `nn.Linear` subclass, as TE's is not) and
  `pytorch.GroupedLinear(num_gemms, in_features, out_features, ...)` with
  `forward(inp, [m_splits,] is_first_microbatch=None)`; `pytorch.RMSNorm(normalized_shape,
  eps, device, params_dtype)`;
- `pytorch.autocast(enabled, calibrating, recipe, amax_reduction_group)` and the older
  `pytorch.fp8_autocast(enabled, calibrating, fp8_recipe, fp8_group)`: inside the context FP8
  is on with that recipe, nested contexts restore the outer state;
- `common.recipe` with `Recipe` and its `Float8CurrentScaling`, `Float8BlockScaling`,
  `MXFP8BlockScaling`, `DelayedScaling` subclasses;
- `pytorch.DotProductAttention(num_attention_heads, kv_channels, num_gqa_groups,
  attention_dropout, attn_mask_type, qkv_format, softmax_scale, window_size)`: "sbhd"/"bshd"
  4-D inputs with "no_mask"/"causal" (diagonal top-left)/"causal_bottom_right"; "thd" 3-D
  inputs with a "padding*" mask type and int32 `cu_seqlens_q/kv` (each sequence attends only
  within itself, rows past the last boundary are zeros); `window_size=(left, right)`, -1 for
  unbounded; output `[..., heads * kv_channels]`;
- `pytorch.attention.rope.apply_rotary_pos_emb(t, freqs, tensor_format, interleaved, fused,
  cu_seqlens)`: `freqs` [S, 1, 1, R] float32 angles, the first R channels rotated in halves.

Anything outside those contracts fails an assertion, so a test passing against the fake shows
that our code hands TE the documented layouts and arguments, and that the results equal the
pure-PyTorch path; it cannot show TE's kernels (the gpu nox session does that).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FakeTransformerEngine", "install_fake_transformer_engine"]

RECIPE_MODULE = "transformer_engine.common.recipe"
RECIPE_NAMES = ("Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling", "DelayedScaling")
MASK_TYPES = (
    "no_mask",
    "padding",
    "causal",
    "padding_causal",
    "causal_bottom_right",
    "padding_causal_bottom_right",
    "arbitrary",
)


@dataclass
class FakeTransformerEngine:
    """Handles on the installed fake and everything it recorded.

    `calls`: ("Linear", is_first_microbatch), ("GroupedLinear", is_first_microbatch, m_splits),
    ("RMSNorm",), ("autocast" | "fp8_autocast", enabled, recipe), in call order.
    `linear_fp8`: (fp8 enabled, recipe) seen by every Linear / GroupedLinear forward.
    `attention_calls`: one dict per DotProductAttention forward (format, mask type, shapes,
    boundaries). `rope_calls`: one dict per fused RoPE call.
    """

    pytorch: types.ModuleType
    recipe: types.ModuleType
    fp8_state: dict = field(
        default_factory=lambda: {"enabled": False, "recipe": None, "group": None}
    )
    calls: list = field(default_factory=list)
    linear_fp8: list = field(default_factory=list)
    attention_calls: list = field(default_factory=list)
    rope_calls: list = field(default_factory=list)


def _window_mask(sq: int, sk: int, align: str | None, window: tuple[int, int] | None) -> Any:
    """Allowed (query, key) pairs of one sequence, or None when every pair is allowed."""
    offset = sk - sq if align == "bottom_right" else 0
    qpos = torch.arange(sq)[:, None] + offset
    kpos = torch.arange(sk)[None, :]
    left, right = window if window is not None else (-1, -1)
    if align is not None:
        right = 0
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        allowed &= kpos <= qpos + right
    if left >= 0:
        allowed &= kpos >= qpos - left
    return None if bool(allowed.all()) else allowed


def _attend(q, k, v, scale, align, window, dropout_p):
    """One sequence: q [Sq, H, D], k/v [Sk, G, D] -> [Sq, H, D] (GQA by repetition)."""
    heads, groups = q.shape[1], k.shape[1]
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    k = k.repeat_interleave(heads // groups, dim=0)
    v = v.repeat_interleave(heads // groups, dim=0)
    mask = _window_mask(q.shape[1], k.shape[1], align, window)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)
    return out.transpose(0, 1)


def _alignment(mask_type: str) -> str | None:
    if "causal" not in mask_type:
        return None
    return "bottom_right" if mask_type.endswith("bottom_right") else "top_left"


def _check_boundaries(cu: torch.Tensor, total: int, longest: int | None) -> list[int]:
    assert cu.dtype == torch.int32 and cu.dim() == 1, f"cu_seqlens: 1-D int32, got {cu.dtype}"
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert bounds[0] == 0 and min(lengths, default=0) >= 0 and bounds[-1] <= total, bounds
    assert longest is None or longest >= max(lengths, default=0), (longest, lengths)
    return bounds


def _attention_class(log: list) -> type:
    class DotProductAttention(nn.Module):
        def __init__(
            self,
            num_attention_heads: int,
            kv_channels: int,
            num_gqa_groups: int | None = None,
            attention_dropout: float = 0.0,
            attn_mask_type: str = "causal",
            qkv_format: str = "sbhd",
            softmax_scale: float | None = None,
            window_size: tuple[int, int] | None = None,
        ) -> None:
            super().__init__()
            assert isinstance(kv_channels, int), kv_channels
            groups = num_gqa_groups or num_attention_heads
            assert num_attention_heads % groups == 0, (num_attention_heads, groups)
            assert attn_mask_type in MASK_TYPES and qkv_format in ("sbhd", "bshd", "thd")
            assert window_size is None or len(window_size) == 2, window_size
            self.init = {
                "num_attention_heads": num_attention_heads,
                "kv_channels": kv_channels,
                "num_gqa_groups": num_gqa_groups,
                "attention_dropout": attention_dropout,
                "attn_mask_type": attn_mask_type,
                "qkv_format": qkv_format,
                "softmax_scale": softmax_scale,
                "window_size": window_size,
            }
            self.heads, self.head_dim, self.groups = num_attention_heads, kv_channels, groups
            self.scale = softmax_scale if softmax_scale is not None else kv_channels**-0.5

        def forward(
            self,
            query_layer: torch.Tensor,
            key_layer: torch.Tensor,
            value_layer: torch.Tensor,
            attention_mask: Any = None,
            qkv_format: str | None = None,
            cu_seqlens_q: torch.Tensor | None = None,
            cu_seqlens_kv: torch.Tensor | None = None,
            cu_seqlens_q_padded: torch.Tensor | None = None,
            cu_seqlens_kv_padded: torch.Tensor | None = None,
            max_seqlen_q: int | None = None,
            max_seqlen_kv: int | None = None,
            attn_mask_type: str | None = None,
            window_size: tuple[int, int] | None = None,
        ) -> torch.Tensor:
            q, k, v = query_layer, key_layer, value_layer
            fmt = qkv_format or self.init["qkv_format"]
            mask_type = attn_mask_type or self.init["attn_mask_type"]
            window = window_size if window_size is not None else self.init["window_size"]
            assert fmt in ("sbhd", "bshd", "thd") and mask_type in MASK_TYPES, (fmt, mask_type)
            assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
            assert k.shape[:-1] == v.shape[:-1], (k.shape, v.shape)
            assert q.shape[-2] == self.heads, f"query heads {q.shape[-2]} != {self.heads}"
            assert k.shape[-2] == self.groups, f"key heads {k.shape[-2]} != {self.groups}"
            assert q.shape[-1] == k.shape[-1] == self.head_dim, "head size != kv_channels"
            assert attention_mask is None, "the fake covers the cu_seqlens form only"
            assert cu_seqlens_q_padded is None and cu_seqlens_kv_padded is None
            p = self.init["attention_dropout"] if self.training else 0.0
            align = _alignment(mask_type)
            call = {"qkv_format": fmt, "attn_mask_type": mask_type, "window_size": window}
            call.update(q=tuple(q.shape), k=tuple(k.shape))
            log.append(call)
            if fmt != "thd":
                assert q.dim() == k.dim() == 4, f"{fmt} needs 4-D q, k, v"
                assert mask_type in ("no_mask", "causal", "causal_bottom_right"), mask_type
                assert cu_seqlens_q is None and cu_seqlens_kv is None
                if fmt == "sbhd":
                    q, k, v = (x.transpose(0, 1) for x in (q, k, v))
                rows = [
                    _attend(q[b], k[b], v[b], self.scale, align, window, p)
                    for b in range(q.shape[0])
                ]
                out = torch.stack(rows)
                if fmt == "sbhd":
                    out = out.transpose(0, 1)
                return out.reshape(*out.shape[:2], -1)
            assert q.dim() == k.dim() == 3, "thd needs 3-D [T, H, D] q, k, v"
            assert "padding" in mask_type, "thd needs a padding mask type"
            assert cu_seqlens_q is not None and cu_seqlens_kv is not None
            assert cu_seqlens_q.shape == cu_seqlens_kv.shape
            cu_q = _check_boundaries(cu_seqlens_q, q.shape[0], max_seqlen_q)
            cu_kv = _check_boundaries(cu_seqlens_kv, k.shape[0], max_seqlen_kv)
            call.update(cu_q=cu_q, cu_kv=cu_kv, max_q=max_seqlen_q, max_kv=max_seqlen_kv)
            parts = [
                _attend(q[a:b], k[c:d], v[c:d], self.scale, align, window, p)
                for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_kv[:-1], cu_kv[1:], strict=True)
            ]
            parts.append(q.new_zeros(q.shape[0] - cu_q[-1], *q.shape[1:]))
            return torch.cat(parts).reshape(q.shape[0], -1)

    return DotProductAttention


def _module_classes(fake: FakeTransformerEngine) -> dict[str, type]:
    def record_linear() -> None:
        fake.linear_fp8.append((fake.fp8_state["enabled"], fake.fp8_state["recipe"]))

    class Linear(nn.Module):
        # Not an nn.Linear subclass, as TE's is not: code that only knows nn.Linear must fail.
        def __init__(
            self, in_features, out_features, bias=True, device=None, params_dtype=None, **_
        ):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            like = nn.Linear(in_features, out_features, bias, device=device, dtype=params_dtype)
            self.weight = like.weight
            self.bias = like.bias

        def forward(self, inp, is_first_microbatch=None):
            fake.calls.append(("Linear", is_first_microbatch))
            record_linear()
            return F.linear(inp, self.weight, self.bias)

    class GroupedLinear(nn.Module):
        def __init__(
            self, num_gemms, in_features, out_features, bias=True, device=None, params_dtype=None
        ):
            super().__init__()
            self.num_gemms, self.in_features, self.out_features = (
                num_gemms,
                in_features,
                out_features,
            )
            for i in range(num_gemms):
                weight = torch.empty(out_features, in_features, device=device, dtype=params_dtype)
                self.register_parameter(f"weight{i}", nn.Parameter(nn.init.normal_(weight)))
                if bias:
                    zeros = torch.zeros(out_features, device=device, dtype=params_dtype)
                    self.register_parameter(f"bias{i}", nn.Parameter(zeros))

        def forward(self, inp, m_splits, is_first_microbatch=None):
            fake.calls.append(("GroupedLinear", is_first_microbatch, list(m_splits)))
            record_linear()
            assert len(m_splits) == self.num_gemms and sum(m_splits) == inp.shape[0]
            outs = [
                F.linear(rows, getattr(self, f"weight{i}"), getattr(self, f"bias{i}", None))
                for i, rows in enumerate(inp.split(list(m_splits)))
            ]
            return torch.cat(outs)

    class RMSNorm(nn.Module):
        def __init__(self, normalized_shape, eps=1e-5, device=None, params_dtype=None, **_):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(
                torch.ones(normalized_shape, device=device, dtype=params_dtype)
            )

        def forward(self, inp):
            fake.calls.append(("RMSNorm",))
            return F.rms_norm(inp, self.weight.shape, self.weight, self.eps)

    return {"Linear": Linear, "GroupedLinear": GroupedLinear, "RMSNorm": RMSNorm}


def _autocasts(fake: FakeTransformerEngine) -> tuple[Any, Any]:
    state = fake.fp8_state

    @contextlib.contextmanager
    def enter(name: str, enabled: bool, recipe: Any, group: Any) -> Iterator[None]:
        fake.calls.append((name, enabled, recipe))
        outer = dict(state)
        state.update(enabled=enabled, recipe=recipe, group=group)
        try:
            yield
        finally:
            state.clear()
            state.update(outer)

    def autocast(enabled=True, calibrating=False, recipe=None, amax_reduction_group=None):
        return enter("autocast", enabled, recipe, amax_reduction_group)

    def fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None):
        return enter("fp8_autocast", enabled, fp8_recipe, fp8_group)

    return autocast, fp8_autocast


def _rope(log: list) -> Any:
    def apply_rotary_pos_emb(
        t, freqs, tensor_format="sbhd", interleaved=False, fused=False, cu_seqlens=None, **_
    ):
        assert tensor_format in ("sbhd", "bshd") and not interleaved and cu_seqlens is None
        assert freqs.dim() == 4 and freqs.shape[1:3] == (1, 1) and freqs.dtype == torch.float32
        seq_dim = 0 if tensor_format == "sbhd" else 1
        assert freqs.shape[0] == t.shape[seq_dim], (freqs.shape, t.shape)
        log.append({"format": tensor_format, "fused": fused, "rows": t.shape[1 - seq_dim]})
        angles = freqs if tensor_format == "sbhd" else freqs.transpose(0, 1)
        rot = freqs.shape[-1]
        head, tail = t[..., :rot], t[..., rot:]
        cos, sin = torch.cos(angles).to(t.dtype), torch.sin(angles).to(t.dtype)
        x1, x2 = head.chunk(2, dim=-1)
        return torch.cat((head * cos + torch.cat((-x2, x1), dim=-1) * sin, tail), dim=-1)

    return apply_rotary_pos_emb


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    # importlib.util.find_spec(name) answers from sys.modules[name].__spec__.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return mod


def install_fake_transformer_engine(
    monkeypatch: Any, *, cuda: bool = False
) -> FakeTransformerEngine:
    """Install the fake `transformer_engine` with pytest's `monkeypatch` and mark TE available.

    With `cuda=True` am-dtype also believes a CUDA device is present, so TE-only options
    (`rope_fusion`, `attn="te"` defaults) validate as they would on a GPU machine. Everything
    is undone when the test ends. Returns the handles and call logs.
    """
    import am_dtype.backend as backend
    import am_dtype.fp8 as fp8

    names = (
        "transformer_engine",
        "transformer_engine.pytorch",
        "transformer_engine.pytorch.attention",
        "transformer_engine.pytorch.attention.rope",
        "transformer_engine.common",
        RECIPE_MODULE,
    )
    mods = {name: _module(name) for name in names}
    for name, mod in mods.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    pytorch, recipe = mods["transformer_engine.pytorch"], mods[RECIPE_MODULE]
    fake = FakeTransformerEngine(pytorch=pytorch, recipe=recipe)
    for name, cls in _module_classes(fake).items():
        setattr(pytorch, name, cls)
    pytorch.autocast, pytorch.fp8_autocast = _autocasts(fake)
    pytorch.fp8_state = fake.fp8_state
    pytorch.DotProductAttention = _attention_class(fake.attention_calls)
    mods["transformer_engine.pytorch.attention.rope"].apply_rotary_pos_emb = _rope(fake.rope_calls)
    # Recipe classes as TE defines them: subclasses of recipe.Recipe, in that module.
    recipe.Recipe = type("Recipe", (), {"__module__": RECIPE_MODULE})
    for name in RECIPE_NAMES:
        setattr(recipe, name, type(name, (recipe.Recipe,), {"__module__": RECIPE_MODULE}))
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(backend, "HAVE_TE", True)
    monkeypatch.setattr(fp8, "HAVE_TE", True)
    if cuda:
        monkeypatch.setattr(backend, "_CUDA", True)
    # A fresh patcher, so the package-level one's "already patched" state never leaks.
    monkeypatch.setattr(fp8, "_patch_te_modules", fp8._make_lazy_te_patcher())
    return fake
