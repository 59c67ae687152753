"""Hugging Face checkpoint layout <-> ours for Gemma 4.

Everything outside the MoE blocks keeps transformers' names (`model.language_model.*`,
`model.vision_tower.*`, `model.embed_vision.*`, `lm_head.weight`). Per MoE layer:

- transformers (what its `save_pretrained` writes, and its modules in memory):
  `...layers.{i}.router.{proj.weight, scale, per_expert_scale}`,
  `...layers.{i}.experts.gate_up_proj` [E, 2F, D] (gate rows first), `.down_proj` [E, D, F];
  a per-expert layout `...layers.{i}.experts.{e}.{gate,up,down}_proj.weight` is read too;
- ours: `...layers.{i}.moe.gate.{proj.weight, scale, per_expert_scale}`,
  `...layers.{i}.moe.experts.gate_and_up_projs` [E, D, 2F], `.down_projs` [E, F, D].

With an expert-parallel mesh `from_hf` stacks only this rank's experts and returns them as
a DTensor sharded on the expert dim (what am-moe's EP parallelizer builds).

Released E2B/E4B checkpoints also hold `k_proj` / `v_proj` / `k_norm` / `v_norm` weights
for the K/V-shared layers, which have no such modules: `from_hf` drops exactly those keys
(logged once, whatever `strict` says); any other unknown key is left for the loader to
report. `strict` follows `HFCheckpointingMixin.from_pretrained`: with True a missing or
mis-shaped expert tensor raises `ExpertCheckpointError` naming the checkpoint key; with
False it is logged and that block is left out, so the loader reports it and initializes
it afresh.

Shape legend: E experts, D hidden size, F expert hidden width.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch

from am_dtype.dtensor import full_tensor
from am_moe.state_dict import (
    ExpertCheckpointError,
    convert_hf_to_native,
    convert_native_to_hf,
    local_expert_range,
)

logger = logging.getLogger(__name__)
_moe_state_dict_logger = logging.getLogger("am_moe.state_dict")

__all__ = ["Gemma4StateDictAdapter"]

_TEXT_LAYER = r"^(?P<prefix>(?:model\.)?language_model\.layers\.(?P<idx>\d+)\.)"
_HF_MOE = re.compile(_TEXT_LAYER + r"(?P<kind>router|experts)\.(?P<rest>.+)$")
_OURS_MOE = re.compile(_TEXT_LAYER + r"moe\.(?P<kind>gate|experts)\.(?P<rest>.+)$")
_DEAD_KV = re.compile(_TEXT_LAYER + r"self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
_EXPERT_PARAMS = (".moe.experts.gate_and_up_projs", ".moe.experts.down_projs")
# transformers-layout expert tensors left after stacking (unused by the model).
_HF_EXPERT = re.compile(r"\.moe\.experts\.(\d+\.(gate|up|down)_proj\.weight|(gate_up|down)_proj)$")
_TO_OURS = {"router": "gate", "experts": "experts"}
_TO_HF = {"gate": "router", "experts": "experts"}


def _ep_mesh(device_mesh: Any, axis: str = "ep") -> Any:
    """The expert-parallel (sub)mesh: the `axis` dim of a named mesh, or an unnamed 1-D mesh."""
    if device_mesh is None:
        return None
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if not names:
        return device_mesh
    if axis not in names:
        return None
    return device_mesh[axis] if len(names) > 1 else device_mesh


def _hf_name(key: str, origin: dict[str, str]) -> str:
    """The checkpoint name of one of our expert keys (a missing per-expert tensor has no
    origin: rename our block prefix back to transformers')."""
    if key in origin:
        return origin[key]
    match = _OURS_MOE.match(key)
    return f"{match['prefix']}{_TO_HF[match['kind']]}.{match['rest']}" if match else key


class Gemma4StateDictAdapter:
    """Convert Gemma 4 state dicts between transformers' layout and ours (see module doc)."""

    def __init__(self, text_config: Any, moe_config: Any = None, dtype: Any = None) -> None:
        self.text_config = text_config
        self.moe_config = moe_config
        self.dtype = dtype
        self.num_experts = getattr(text_config, "num_experts", None) or 0
        layers = int(text_config.num_hidden_layers)
        shared = int(getattr(text_config, "num_kv_shared_layers", 0) or 0)
        self.kv_shared_layers = frozenset(range(layers - shared, layers)) if shared else frozenset()
        self._logged_dead_kv = False

    # ------------------------------------------------------------------ ours -> HF
    def to_hf(
        self, state_dict: dict[str, torch.Tensor], exclude_key_regex: str | None = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        """Our state dict -> transformers' layout (stacked experts, `router.` names)."""
        # TE modules' `_extra_state` (FP8 metadata) has no place in transformers' layout.
        full = {k: full_tensor(v) for k, v in state_dict.items() if not k.endswith("._extra_state")}
        if self.num_experts:
            full = convert_native_to_hf(full, gated=True, layout="stacked")
        out = {}
        for key, value in full.items():
            match = _OURS_MOE.match(key)
            if match:
                key = f"{match['prefix']}{_TO_HF[match['kind']]}.{match['rest']}"
            out[key] = value
        if exclude_key_regex is not None:
            out = {k: v for k, v in out.items() if not re.match(exclude_key_regex, k)}
        return out

    # ------------------------------------------------------------------ HF -> ours
    def from_hf(
        self,
        hf_state_dict: dict[str, torch.Tensor],
        device_mesh: Any = None,
        strict: bool = True,
        ep_axis_name: str = "ep",
    ) -> dict[str, torch.Tensor]:
        """transformers' layout (stacked or per-expert experts) -> ours.

        With `device_mesh` (an EP mesh, or a mesh with an `ep_axis_name` dim) only this
        rank's experts are read, returned as DTensor Shard(0) over that mesh. Missing or
        mis-shaped expert tensors raise `ExpertCheckpointError` naming them as the
        checkpoint does (`strict=False`: logged, the block left out for the loader to
        report). The dead K/V keys of K/V-shared layers are dropped and logged once;
        every other key is returned (unknown ones for the loader to report).
        """
        if not isinstance(strict, bool):
            raise TypeError(f"strict={strict!r} must be True or False")
        renamed: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        dropped = []
        for key, value in hf_state_dict.items():
            dead = _DEAD_KV.match(key)
            if dead and int(dead["idx"]) in self.kv_shared_layers:
                dropped.append(key)
                continue
            match = _HF_MOE.match(key)
            ours = key
            if match and self.num_experts:
                ours = f"{match['prefix']}moe.{_TO_OURS[match['kind']]}.{match['rest']}"
            renamed[ours] = value
            origin[ours] = key
        self._log_dropped(dropped)
        if not self.num_experts:
            return renamed
        ep_mesh = _ep_mesh(device_mesh, ep_axis_name)
        expert_range = None
        if ep_mesh is not None:
            expert_range = local_expert_range(
                self.num_experts, ep_mesh.get_local_rank(), ep_mesh.size()
            )
        convert = dict(n_experts=self.num_experts, gated=True, expert_range=expert_range)
        try:
            native = convert_hf_to_native(renamed, **convert)
        except ExpertCheckpointError as err:
            named = ExpertCheckpointError(
                [_hf_name(k, origin) for k in err.missing],
                [(_hf_name(k, origin), problem) for k, problem in err.mismatched],
            )
            if strict:
                raise named from None
            logger.warning("%s\n(strict=False: those blocks are left out)", named)
            with _quiet(_moe_state_dict_logger):  # reported above under the checkpoint names
                native = convert_hf_to_native(renamed, strict=False, **convert)
        # Expert tensors the model does not use keep their checkpoint names in the report.
        native = {(origin.get(k, k) if _HF_EXPERT.search(k) else k): v for k, v in native.items()}
        if ep_mesh is not None:
            native = {k: _shard(k, v, ep_mesh) for k, v in native.items()}
        return native

    def _log_dropped(self, dropped: list[str]) -> None:
        if dropped and not self._logged_dead_kv:
            self._logged_dead_kv = True
            logger.info(
                "Dropping %d K/V weights of K/V-shared layers %s (they have no modules): %s",
                len(dropped),
                sorted(self.kv_shared_layers),
                dropped[:8] + (["..."] if len(dropped) > 8 else []),
            )


@contextlib.contextmanager
def _quiet(log: logging.Logger) -> Iterator[None]:
    previous = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = previous


def _shard(key: str, value: torch.Tensor, ep_mesh: Any) -> torch.Tensor:
    if not key.endswith(_EXPERT_PARAMS):
        return value
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(value.contiguous(), ep_mesh, [Shard(0)], run_check=False)
