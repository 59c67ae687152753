"""Mixture-of-experts layers: gates, grouped experts, expert-parallel dispatch, EP + FSDP2 parallelizer.

Public names are re-exported here and resolved lazily on first use, so `import am_moe` stays
cheap (the distributed modules pull in FSDP2 and DTensor only when asked for).
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> submodule that defines it.
_EXPORTS: dict[str, str] = {
    "MoEConfig": "config",
    "EXPERT_ACTIVATIONS": "config",
    "SCORE_FUNCS": "config",
    "SHARED_EXPERT_ACTIVATIONS": "config",
    "is_gated": "config",
    "ACTIVATIONS": "experts",
    "EXPERT_IMPLS": "experts",
    "apply_activation": "experts",
    "iter_fsdp_modules": "fsdp_mixin",
    "HF_LAYOUTS": "state_dict",
    "ExpertCheckpointError": "state_dict",
    "Gate": "gate",
    "FakeBalancedGate": "gate",
    "GroupedExperts": "experts",
    "run_experts": "experts",
    "MLP": "layers",
    "MoE": "layers",
    "relu2": "layers",
    "TokenDispatcher": "dispatch",
    "LocalDispatcher": "dispatch",
    "AllToAllDispatcher": "dispatch",
    "DeepEPDispatcher": "dispatch",
    "HybridEPDispatcher": "dispatch",
    "UCCLEPDispatcher": "dispatch",
    "DispatchStats": "dispatch",
    "build_dispatcher": "dispatch",
    "checkpoint_blocks": "activation_checkpointing",
    "is_checkpointed": "activation_checkpointing",
    "uncheckpoint_blocks": "activation_checkpointing",
    "unwrap_checkpointed": "activation_checkpointing",
    "apply_ep": "parallelizer",
    "parallelize_model": "parallelizer",
    "MoEFSDPSyncMixin": "fsdp_mixin",
    "convert_hf_to_native": "state_dict",
    "convert_native_to_hf": "state_dict",
    "hf_to_native_experts": "state_dict",
    "native_to_hf_experts": "state_dict",
    "local_expert_range": "state_dict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'am_moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"am_moe.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
