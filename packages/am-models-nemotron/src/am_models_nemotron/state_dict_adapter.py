"""Hugging Face checkpoint layout <-> the native Nemotron-H layout.

Three layouts meet here:

- on disk (released checkpoints and what transformers 5 `save_pretrained`
  writes): prefix `backbone.`, `embeddings`, `norm_f`, one tensor per expert
  `...mixer.experts.{e}.up_proj.weight` [F, D] / `.down_proj.weight` [D, F];
- transformers 5 in memory (a `state_dict()` of its model): prefix `model.`,
  experts stacked `...mixer.experts.up_proj` [E, F, D] / `.down_proj` [E, D, F];
- native (ours): `model.embed_tokens`, `model.norm`, experts stacked
  input-major `...mixer.experts.gate_and_up_projs` [E, D, F] /
  `.down_projs` [E, F, D] (am-moe's GroupedExperts).

`from_hf` reads either HF layout; `to_hf` writes the on-disk one. With an
expert-parallel mesh, `from_hf` stacks only this rank's experts (the others'
tensors are never copied) and returns them as a DTensor sharded on the
expert dim, which is what am-moe's EP parallelizer builds.

Shape legend: E experts, L local experts, D expert input width, F expert
hidden width.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from am_dtype.dtensor import full_tensor
from am_moe.state_dict import (
    ExpertCheckpointError,
    convert_hf_to_native,
    convert_native_to_hf,
    local_expert_range,
)

# (native prefix, on-disk HF prefix); the first match wins.
PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.", "backbone.embeddings."),
    ("model.norm.", "backbone.norm_f."),
    ("model.layers.", "backbone.layers."),
)
_EXPERT_PARAMS = ("experts.gate_and_up_projs", "experts.down_projs")
_EXPERT_BIASES = ("experts.gate_up_proj_bias", "experts.down_proj_bias")
# HF expert tensors (either layout): left over after conversion means the model has no use
# for them, and the loader reports them under their checkpoint names.
_HF_EXPERT_KEY = re.compile(
    r"\.experts\.(\d+\.(gate|up|down)_proj\.(weight|bias)|(gate_up|up|down)_proj(_bias)?)$"
)


def _rename(key: str, src: int, dst: int) -> str:
    for pair in PREFIX_MAP:
        if key.startswith(pair[src]):
            return pair[dst] + key[len(pair[src]) :]
    return key


def _ep_mesh(device_mesh: Any, ep_axis_name: str = "ep") -> Any:
    """The expert-parallel (sub)mesh: the `ep_axis_name` dim of a named mesh, or an unnamed 1-D mesh."""
    if device_mesh is None:
        return None
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if not names:
        return device_mesh
    if ep_axis_name not in names:
        return None
    return device_mesh[ep_axis_name] if len(names) > 1 else device_mesh


class NemotronHStateDictAdapter:
    """Convert state dicts between transformers' NemotronH layout and ours.

    `to_hf(state_dict)` -> on-disk layout; `from_hf(hf_state_dict,
    device_mesh=None)` -> native layout (accepts both HF layouts). Expert
    tensors go through am-moe's `convert_*` helpers (relu2 experts: no gate).
    """

    def __init__(self, config: Any, moe_config: Any, backend: Any, dtype: torch.dtype):
        self.config = config
        self.moe_config = moe_config
        self.backend = backend
        self.dtype = dtype
        self.num_experts = moe_config.n_routed_experts if moe_config is not None else 0  # dense

    def to_hf(
        self, state_dict: dict[str, torch.Tensor], exclude_key_regex: str | None = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        """Native state dict -> on-disk HF layout (per-expert tensors, `backbone.` prefix)."""
        full = {k: full_tensor(v) for k, v in state_dict.items()}
        hf = convert_native_to_hf(full, gated=False, layout="per_expert")
        out = {_rename(k, 0, 1): v for k, v in hf.items()}
        if exclude_key_regex is not None:
            out = {k: v for k, v in out.items() if not re.match(exclude_key_regex, k)}
        return out

    def from_hf(
        self,
        hf_state_dict: dict[str, torch.Tensor],
        device_mesh: Any = None,
        strict: bool = True,
        ep_axis_name: str = "ep",
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """HF state dict (on-disk or transformers in-memory layout) -> native state dict.

        With `device_mesh` (an EP mesh, or a mesh with an `ep_axis_name` dim, as given to
        `am_moe.parallelizer.parallelize_model`) only this rank's experts are read,
        returned as a DTensor Shard(0) over that mesh.
        Missing or mis-shaped expert tensors raise `ExpertCheckpointError` naming
        them as the checkpoint does (`strict=False`: logged, the block left out);
        expert tensors the model does not use (experts beyond its count, `gate_proj`
        of relu2 experts) are returned under their checkpoint names for the loader
        to report as unexpected.
        """
        ep_mesh = _ep_mesh(device_mesh, ep_axis_name)
        expert_range = None
        if ep_mesh is not None and self.num_experts:
            expert_range = local_expert_range(
                self.num_experts, ep_mesh.get_local_rank(), ep_mesh.size()
            )
        renamed, origin = {}, {}
        for key, value in hf_state_dict.items():
            on_disk = "backbone." + key[len("model.") :] if key.startswith("model.") else key
            native_key = _rename(on_disk, 1, 0)  # "model." is transformers' in-memory prefix
            renamed[native_key] = value
            origin[native_key] = key
        try:
            native = convert_hf_to_native(
                renamed,
                n_experts=self.num_experts,
                gated=False,
                expert_range=expert_range,
                strict=strict,
            )
        except ExpertCheckpointError as err:
            raise ExpertCheckpointError(
                [origin.get(k, _rename(k, 0, 1)) for k in err.missing],
                [(origin.get(k, k), problem) for k, problem in err.mismatched],
            ) from None
        native = {
            (origin[k] if k in origin and _HF_EXPERT_KEY.search(k) else k): v
            for k, v in native.items()
        }
        if ep_mesh is not None:
            native = {k: self._shard(k, v, ep_mesh) for k, v in native.items()}
        return native

    @staticmethod
    def _shard(key: str, value: torch.Tensor, ep_mesh: Any) -> torch.Tensor:
        if not key.endswith(_EXPERT_PARAMS + _EXPERT_BIASES):
            return value
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(value.contiguous(), ep_mesh, [Shard(0)], run_check=False)
