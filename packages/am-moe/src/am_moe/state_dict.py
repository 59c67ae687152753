"""Convert expert weights between Hugging Face layouts and the stacked native layout.

Native (`GroupedExperts`, input-major):
    {p}experts.gate_and_up_projs  [E, D, 2F] gate half [:F], up half [F:]  ([E, D, F] for relu2)
    {p}experts.down_projs         [E, F, D]
    {p}experts.gate_up_proj_bias  [E, 2F]    {p}experts.down_proj_bias  [E, D]   (optional)

Hugging Face, read by `hf_to_native_experts` and written by `native_to_hf_experts`:
- "per_expert" (released checkpoints): {p}experts.{i}.gate_proj.weight [F, D],
  {p}experts.{i}.up_proj.weight [F, D], {p}experts.{i}.down_proj.weight [D, F]
  (+ `.bias`); relu2 experts have no gate_proj.
- "stacked" (transformers 5.x modules in memory, output-major): {p}experts.gate_up_proj
  [E, 2F, D] (gated, gate rows first) or {p}experts.up_proj [E, F, D] (relu2), and
  {p}experts.down_proj [E, D, F] (+ `gate_up_proj_bias` / `up_proj_bias`, `down_proj_bias`).

Under expert parallelism pass `expert_range=(start, stop)` (see `local_expert_range`):
only those experts' tensors are read, so a lazy checkpoint reader touches local experts only.
Conversions are pure transposes and concatenations, so a round trip is bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "HF_LAYOUTS",
    "convert_hf_to_native",
    "convert_native_to_hf",
    "hf_to_native_experts",
    "local_expert_range",
    "native_to_hf_experts",
]

HF_LAYOUTS = ("per_expert", "stacked")
_NATIVE_UP, _NATIVE_DOWN = "experts.gate_and_up_projs", "experts.down_projs"
_NATIVE_UP_BIAS, _NATIVE_DOWN_BIAS = "experts.gate_up_proj_bias", "experts.down_proj_bias"
# The block prefix is empty or ends with "." (so `shared_experts.*` never matches).
_PER_EXPERT = re.compile(
    r"^(?P<prefix>(?:.*\.)?)experts\.(\d+)\.(gate|up|down)_proj\.(weight|bias)$"
)
_STACKED = re.compile(r"^(?P<prefix>(?:.*\.)?)experts\.(gate_up_proj|up_proj|down_proj)(_bias)?$")
_NATIVE = re.compile(r"^(?P<prefix>(?:.*\.)?)experts\.(gate_and_up_projs|down_projs)$")


def local_expert_range(n_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    """[start, stop) of the experts EP rank `ep_rank` owns (contiguous, equal blocks)."""
    if ep_size < 1 or n_experts % ep_size:
        raise ValueError(f"n_experts={n_experts} must divide evenly over ep_size={ep_size}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must lie in [0, {ep_size})")
    per_rank = n_experts // ep_size
    return ep_rank * per_rank, (ep_rank + 1) * per_rank


def _range(n_experts: int, expert_range: tuple[int, int] | None) -> range:
    start, stop = expert_range or (0, n_experts)
    if not 0 <= start < stop <= n_experts:
        raise ValueError(
            f"expert_range={expert_range} must satisfy 0 <= start < stop <= {n_experts}"
        )
    return range(start, stop)


def _take(sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"expert weight {key!r} is missing from the state dict")
    return sd[key]


def _per_expert_to_native(sd, p, experts, gated, bias) -> dict[str, Tensor]:
    def proj(i: int, name: str, kind: str) -> Tensor:
        return _take(sd, f"{p}experts.{i}.{name}_proj.{kind}")

    if gated:
        up_LHD = [torch.cat([proj(i, "gate", "weight"), proj(i, "up", "weight")]) for i in experts]
    else:
        up_LHD = [proj(i, "up", "weight") for i in experts]
    out = {
        p + _NATIVE_UP: torch.stack(up_LHD).transpose(1, 2).contiguous(),
        p + _NATIVE_DOWN: torch.stack([proj(i, "down", "weight") for i in experts])
        .transpose(1, 2)
        .contiguous(),
    }
    if bias:
        names = ("gate", "up") if gated else ("up",)
        out[p + _NATIVE_UP_BIAS] = torch.stack(
            [torch.cat([proj(i, n, "bias") for n in names]) for i in experts]
        )
        out[p + _NATIVE_DOWN_BIAS] = torch.stack([proj(i, "down", "bias") for i in experts])
    return out


def _stacked_to_native(sd, p, experts, gated, bias) -> dict[str, Tensor]:
    up_name = "gate_up_proj" if gated else "up_proj"
    sl = slice(experts.start, experts.stop)
    out = {
        p + _NATIVE_UP: _take(sd, f"{p}experts.{up_name}")[sl].transpose(1, 2).contiguous(),
        p + _NATIVE_DOWN: _take(sd, f"{p}experts.down_proj")[sl].transpose(1, 2).contiguous(),
    }
    if bias:
        out[p + _NATIVE_UP_BIAS] = _take(sd, f"{p}experts.{up_name}_bias")[sl].clone()
        out[p + _NATIVE_DOWN_BIAS] = _take(sd, f"{p}experts.down_proj_bias")[sl].clone()
    return out


def hf_to_native_experts(
    sd: Mapping[str, Tensor],
    *,
    prefix: str,
    n_experts: int,
    gated: bool,
    layout: str = "per_expert",
    expert_range: tuple[int, int] | None = None,
    bias: bool = False,
) -> dict[str, Tensor]:
    """Native stacked expert tensors of the block at `prefix` (e.g. "model.layers.1.mixer.").

    Returns only the experts in `expert_range` (default: all), stacked in expert order.
    """
    experts = _range(n_experts, expert_range)
    if layout == "per_expert":
        return _per_expert_to_native(sd, prefix, experts, gated, bias)
    if layout == "stacked":
        return _stacked_to_native(sd, prefix, experts, gated, bias)
    raise ValueError(f"layout={layout!r} is not supported; accepted: {list(HF_LAYOUTS)}")


def native_to_hf_experts(
    sd: Mapping[str, Tensor],
    *,
    prefix: str,
    gated: bool,
    layout: str = "per_expert",
    expert_offset: int = 0,
) -> dict[str, Tensor]:
    """Hugging Face tensors for the native experts at `prefix`.

    `expert_offset` is the global id of the first stacked expert (an EP rank's local block);
    biases are converted when present.
    """
    if layout not in HF_LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; accepted: {list(HF_LAYOUTS)}")
    up_LHD = _take(sd, prefix + _NATIVE_UP).transpose(1, 2)
    down_LDF = _take(sd, prefix + _NATIVE_DOWN).transpose(1, 2)
    up_bias = sd.get(prefix + _NATIVE_UP_BIAS)
    down_bias = sd.get(prefix + _NATIVE_DOWN_BIAS)
    if layout == "stacked":
        up_name = "gate_up_proj" if gated else "up_proj"
        out = {
            f"{prefix}experts.{up_name}": up_LHD.contiguous(),
            f"{prefix}experts.down_proj": down_LDF.contiguous(),
        }
        if up_bias is not None:
            out[f"{prefix}experts.{up_name}_bias"] = up_bias.clone()
            out[f"{prefix}experts.down_proj_bias"] = down_bias.clone()
        return out
    out = {}
    for j in range(up_LHD.shape[0]):
        p = f"{prefix}experts.{expert_offset + j}."
        halves = up_LHD[j].chunk(2) if gated else (None, up_LHD[j])
        bias_halves = (
            (None, None)
            if up_bias is None
            else (up_bias[j].chunk(2) if gated else (None, up_bias[j]))
        )
        for name, w, b in (("gate", halves[0], bias_halves[0]), ("up", halves[1], bias_halves[1])):
            if w is not None:
                out[f"{p}{name}_proj.weight"] = w.contiguous()
            if b is not None:
                out[f"{p}{name}_proj.bias"] = b.clone()
        out[f"{p}down_proj.weight"] = down_LDF[j].contiguous()
        if down_bias is not None:
            out[f"{p}down_proj.bias"] = down_bias[j].clone()
    return out


def _expert_prefixes(sd: Mapping[str, Tensor], pattern: re.Pattern) -> dict[str, str]:
    """Block prefix -> layout name, for every experts block the keys mention."""
    found: dict[str, str] = {}
    for key in sd:
        match = pattern.match(key)
        if match:
            found[match["prefix"]] = match.group(2)
    return found


def convert_hf_to_native(
    sd: Mapping[str, Tensor],
    *,
    n_experts: int,
    gated: bool,
    expert_range: tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """A whole state dict: every experts block (either HF layout) stacked, other keys kept.

    Non-expert keys of an MoE block (`gate.weight`, `gate.e_score_correction_bias`,
    `shared_experts.*`, latent projections) already share the native names.
    """
    out = {}
    per_expert = {m["prefix"] for k in sd if (m := _PER_EXPERT.match(k))}
    stacked = set(_expert_prefixes(sd, _STACKED))
    for key, value in sd.items():
        if not (_PER_EXPERT.match(key) or _STACKED.match(key)):
            out[key] = value
    for prefix in per_expert | stacked:
        layout = "per_expert" if prefix in per_expert else "stacked"
        bias_key = f"{prefix}experts.down_proj_bias"
        bias = bias_key in sd or f"{prefix}experts.0.down_proj.bias" in sd
        out.update(
            hf_to_native_experts(
                sd,
                prefix=prefix,
                n_experts=n_experts,
                gated=gated,
                layout=layout,
                expert_range=expert_range,
                bias=bias,
            )
        )
    return out


def convert_native_to_hf(
    sd: Mapping[str, Tensor], *, gated: bool, layout: str = "per_expert", expert_offset: int = 0
) -> dict[str, Tensor]:
    """A whole native state dict with every experts block written in the HF `layout`."""
    prefixes = set(_expert_prefixes(sd, _NATIVE))
    native_keys = {p + k for p in prefixes for k in (_NATIVE_UP, _NATIVE_DOWN)}
    native_keys |= {p + k for p in prefixes for k in (_NATIVE_UP_BIAS, _NATIVE_DOWN_BIAS)}
    out = {k: v for k, v in sd.items() if k not in native_keys}
    for prefix in prefixes:
        out.update(
            native_to_hf_experts(
                sd, prefix=prefix, gated=gated, layout=layout, expert_offset=expert_offset
            )
        )
    return out
