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

Reading validates: an expert tensor that is missing, or whose shape differs from the other
experts of its block (or a stacked tensor whose expert dim is not `n_experts`), raises
`ExpertCheckpointError` naming every such key; expert-looking keys the model does not use
(experts beyond `n_experts`, `gate_proj` in a relu2 model, the other layout's tensors) are
returned unchanged so the loader reports them as unexpected, never dropped in silence.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "HF_LAYOUTS",
    "ExpertCheckpointError",
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
    r"^(?P<prefix>(?:.*\.)?)experts\.(?P<idx>\d+)\.(?P<proj>gate|up|down)_proj\."
    r"(?P<kind>weight|bias)$"
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


class ExpertCheckpointError(KeyError, ValueError):
    """Expert tensors of a checkpoint that cannot be stacked: names every missing key and
    every mis-shaped one with its shape. A KeyError (a key is absent) and a ValueError."""

    def __init__(self, missing: list[str] = (), mismatched: list[tuple[str, str]] = ()):
        self.missing = list(missing)
        self.mismatched = list(mismatched)
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = ["expert tensors cannot be stacked:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {self.missing}")
        lines += [f"  {key}: {problem}" for key, problem in self.mismatched]
        return "\n".join(lines)


class _Block:
    """Reading one experts block: the keys it uses and the problems found."""

    def __init__(self, sd: Mapping[str, Tensor]):
        self.sd = sd
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[tuple[str, str]] = []

    def get(self, key: str) -> Tensor | None:
        if key not in self.sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.sd[key]

    def same_shapes(self, tensors: dict[str, Tensor | None]) -> None:
        """Flag tensors whose shape differs from the most common one among ``tensors``."""
        shapes = {k: tuple(t.shape) for k, t in tensors.items() if t is not None}
        if not shapes:
            return
        reference = Counter(shapes.values()).most_common(1)[0][0]
        for key, shape in shapes.items():
            if shape != reference:
                self.mismatched.append(
                    (key, f"shape {list(shape)}, other experts of this block: {list(reference)}")
                )

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched)


def _per_expert_to_native(block, p, experts, gated, bias, n_experts) -> dict[str, Tensor]:
    projs = ("gate", "up", "down") if gated else ("up", "down")
    kinds = ("weight", "bias") if bias else ("weight",)

    def key(i: int, proj: str, kind: str) -> str:
        return f"{p}experts.{i}.{proj}_proj.{kind}"

    # Every expert of the model is used (other EP ranks' ones are read there, not here).
    block.used |= {key(i, n, k) for i in range(n_experts) for n in projs for k in kinds} & set(
        block.sd
    )
    got = {
        (n, k): {key(i, n, k): block.get(key(i, n, k)) for i in experts}
        for n in projs
        for k in kinds
    }
    for kind in kinds:
        # gate and up rows are concatenated, so they must agree with each other too
        block.same_shapes({**got.get(("gate", kind), {}), **got["up", kind]})
        block.same_shapes(got["down", kind])
    if not block.ok:
        return {}

    def stacked(kind: str) -> tuple[Tensor, Tensor]:
        """(up [E, H, D] or [E, H], down) of `kind`, gate rows before up rows."""
        ups = list(got["up", kind].values())
        if gated:
            ups = [torch.cat(pair) for pair in zip(got["gate", kind].values(), ups, strict=True)]
        return torch.stack(ups), torch.stack(list(got["down", kind].values()))

    up_EHD, down_EDF = stacked("weight")
    out = {
        p + _NATIVE_UP: up_EHD.transpose(1, 2).contiguous(),
        p + _NATIVE_DOWN: down_EDF.transpose(1, 2).contiguous(),
    }
    if bias:
        out[p + _NATIVE_UP_BIAS], out[p + _NATIVE_DOWN_BIAS] = stacked("bias")
    return out


def _stacked_to_native(block, p, experts, gated, bias, n_experts) -> dict[str, Tensor]:
    up_name = "gate_up_proj" if gated else "up_proj"
    keys = {"up": f"{p}experts.{up_name}", "down": f"{p}experts.down_proj"}
    if bias:
        keys |= {"up_bias": f"{p}experts.{up_name}_bias", "down_bias": f"{p}experts.down_proj_bias"}
    got = {name: block.get(key) for name, key in keys.items()}
    for name, tensor in got.items():
        if tensor is not None and (tensor.dim() == 0 or tensor.shape[0] != n_experts):
            block.mismatched.append(
                (keys[name], f"shape {list(tensor.shape)}: dim 0 must be the {n_experts} experts")
            )
    if not block.ok:
        return {}
    sl = slice(experts.start, experts.stop)
    out = {
        p + _NATIVE_UP: got["up"][sl].transpose(1, 2).contiguous(),
        p + _NATIVE_DOWN: got["down"][sl].transpose(1, 2).contiguous(),
    }
    if bias:
        out[p + _NATIVE_UP_BIAS] = got["up_bias"][sl].clone()
        out[p + _NATIVE_DOWN_BIAS] = got["down_bias"][sl].clone()
    return out


def _read_block(sd, prefix, n_experts, gated, layout, expert_range, bias) -> tuple[dict, _Block]:
    experts = _range(n_experts, expert_range)
    block = _Block(sd)
    if layout == "per_expert":
        return _per_expert_to_native(block, prefix, experts, gated, bias, n_experts), block
    if layout == "stacked":
        return _stacked_to_native(block, prefix, experts, gated, bias, n_experts), block
    raise ValueError(f"layout={layout!r} is not supported; accepted: {list(HF_LAYOUTS)}")


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
    Raises `ExpertCheckpointError` naming every missing or mis-shaped expert tensor.
    """
    native, block = _read_block(sd, prefix, n_experts, gated, layout, expert_range, bias)
    if not block.ok:
        raise ExpertCheckpointError(block.missing, block.mismatched)
    return native


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


def _block_has_bias(sd: Mapping[str, Tensor], prefix: str, per_expert: bool) -> bool:
    if not per_expert:
        names = ("gate_up_proj", "up_proj", "down_proj")
        return any(f"{prefix}experts.{n}_bias" in sd for n in names)
    return any(
        (m := _PER_EXPERT.match(k)) and m["prefix"] == prefix and m["kind"] == "bias" for k in sd
    )


def convert_hf_to_native(
    sd: Mapping[str, Tensor],
    *,
    n_experts: int,
    gated: bool,
    expert_range: tuple[int, int] | None = None,
    strict: bool = True,
) -> dict[str, Tensor]:
    """A whole state dict: every experts block (either HF layout) stacked, other keys kept.

    Non-expert keys of an MoE block (`gate.weight`, `gate.e_score_correction_bias`,
    `shared_experts.*`, latent projections) already share the native names. Expert keys the
    model does not use (experts >= `n_experts`, `gate_proj` when not `gated`, a second
    layout's tensors) are kept under their names, for the loader to report as unexpected.
    A block with missing or mis-shaped expert tensors raises `ExpertCheckpointError`
    naming them all (every block checked first); with `strict=False` it is logged and the
    block's native tensors are left out (the loader then reports them missing).
    """
    if n_experts == 0:  # a dense model: any expert tensor is one it does not use
        return dict(sd)
    per_expert = {m["prefix"] for k in sd if (m := _PER_EXPERT.match(k))}
    stacked = set(_expert_prefixes(sd, _STACKED)) - per_expert
    native: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[tuple[str, str]] = []
    for prefix in sorted(per_expert | stacked):
        layout = "per_expert" if prefix in per_expert else "stacked"
        bias = _block_has_bias(sd, prefix, prefix in per_expert)
        tensors, block = _read_block(sd, prefix, n_experts, gated, layout, expert_range, bias)
        native.update(tensors)
        used |= block.used
        missing += block.missing
        mismatched += block.mismatched
    if missing or mismatched:
        error = ExpertCheckpointError(missing, mismatched)
        if strict:
            raise error
        logger.warning("%s\n(strict=False: those blocks are left out)", error)
    out = {k: v for k, v in sd.items() if k not in used}
    out.update(native)
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
