"""Nemotron-H (Nemotron 3) hybrid Mamba2 / attention / MLP / MoE model, exact against transformers."""

from am_models_nemotron.cache import NemotronHybridCache
from am_models_nemotron.layers import (
    MIXER_BUILDERS,
    BlockInputs,
    NemotronAttention,
    NemotronBlock,
    NemotronMLP,
    resolve_block_types,
)
from am_models_nemotron.mamba import Mamba2Mixer, MambaState
from am_models_nemotron.model import (
    ModelClass,
    NemotronHCausalLMOutputWithPast,
    NemotronHForCausalLM,
    NemotronV3Model,
    nemotron_moe_config,
)
from am_models_nemotron.mtp import MTPConfig, NemotronMTP
from am_models_nemotron.state_dict_adapter import NemotronHStateDictAdapter

__all__ = [
    "MIXER_BUILDERS",
    "BlockInputs",
    "Mamba2Mixer",
    "MambaState",
    "MTPConfig",
    "ModelClass",
    "NemotronAttention",
    "NemotronBlock",
    "NemotronHCausalLMOutputWithPast",
    "NemotronHForCausalLM",
    "NemotronHStateDictAdapter",
    "NemotronHybridCache",
    "NemotronMLP",
    "NemotronMTP",
    "NemotronV3Model",
    "nemotron_moe_config",
    "resolve_block_types",
]
