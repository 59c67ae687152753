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
(logged once); any other unknown key is left for the loader to report.

Shape legend: E experts, D hidden size, F expert hidden width.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from am_dtype.dtensor import full_tensor
from am_moe.state_dict import convert_hf_to_native, convert_native_to_hf, local_expert_range

logger = logging.getLogger(__name__)

__all__ = ["Gemma4StateDictAdapter"]

_TEXT_LAYER = r"^(?P<prefix>(?:model\.)?language_model\.layers\.(?P<idx>\d+)\.)"
_HF_MOE = re.compile(_TEXT_LAYER + r"(?P<kind>router|experts)\.(?P<rest>.+)$")
_OURS_MOE = re.compile(_TEXT_LAYER + r"moe\.(?P<kind>gate|experts)\.(?P<rest>.+)$")
_DEAD_KV = re.compile(_TEXT_LAYER + r"self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
_EXPERT_PARAMS = (".moe.experts.gate_and_up_projs", ".moe.experts.down_projs")
_TO_OURS = {"router": "gate", "experts": "experts"}
_TO_HF = {"gate": "router", "experts": "experts"}


def _ep_mesh(device_mesh: Any) -> Any:
    """The expert-parallel (sub)mesh: the "ep" dim of a named mesh, or an unnamed 1-D mesh."""
    if device_mesh is None:
        return None
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if not names:
        return device_mesh
    if "ep" not in names:
        return None
    return device_mesh["ep"] if len(names) > 1 else device_mesh


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
        full = {k: full_tensor(v) for k, v in state_dict.items()}
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
        self, hf_state_dict: dict[str, torch.Tensor], device_mesh: Any = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        """transformers' layout (stacked or per-expert experts) -> ours.

        With `device_mesh` (an EP mesh, or a mesh with an "ep" dim) only this rank's
        experts are read, returned as DTensor Shard(0) over that mesh.
        """
        renamed = {}
        dropped = []
        for key, value in hf_state_dict.items():
            dead = _DEAD_KV.match(key)
            if dead and int(dead["idx"]) in self.kv_shared_layers:
                dropped.append(key)
                continue
            match = _HF_MOE.match(key)
            if match and self.num_experts:
                key = f"{match['prefix']}moe.{_TO_OURS[match['kind']]}.{match['rest']}"
            renamed[key] = value
        self._log_dropped(dropped)
        if not self.num_experts:
            return renamed
        ep_mesh = _ep_mesh(device_mesh)
        expert_range = None
        if ep_mesh is not None:
            expert_range = local_expert_range(
                self.num_experts, ep_mesh.get_local_rank(), ep_mesh.size()
            )
        native = convert_hf_to_native(
            renamed, n_experts=self.num_experts, gated=True, expert_range=expert_range
        )
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


def _shard(key: str, value: torch.Tensor, ep_mesh: Any) -> torch.Tensor:
    if not key.endswith(_EXPERT_PARAMS):
        return value
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(value.contiguous(), ep_mesh, [Shard(0)], run_check=False)
