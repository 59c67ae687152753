"""apply_parameter_freezing and the freezers of never-used parameters (Gemma 4 KV sharing on a
real transformers model, DeepSeek V4 / MiniMax M3 indexers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM, Gemma4RMSNorm

from am_utils import (
    apply_parameter_freezing,
    freeze_deepseek_v4_indexer_params,
    freeze_minimax_m3_indexer_params,
    freeze_unused_kv_sharing_params,
)
from am_utils.freezing import FREEZE_CONFIG_KEYS, _freeze_module_by_attribute_and_patterns


class ToyVLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Linear(4, 4)
        self.audio_tower = nn.Linear(4, 4)
        self.multi_modal_projector = nn.Linear(4, 4)
        self.language_model = nn.ModuleDict(
            {"embed_tokens": nn.Embedding(10, 4), "layers": nn.ModuleList([nn.Linear(4, 4)])}
        )
        self.lm_head = nn.Linear(4, 10)
        self.patch_generator = nn.Module()
        self.patch_generator.video_embedder = nn.Linear(4, 4)

    def get_input_embeddings(self):
        return self.language_model["embed_tokens"]


def frozen_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_default_freezes_vision_tower_only():
    model = ToyVLM()
    apply_parameter_freezing(model, {})
    assert frozen_names(model) == {"vision_tower.weight", "vision_tower.bias"}


def test_all_flags():
    model = ToyVLM()
    apply_parameter_freezing(
        model,
        {
            "freeze_vision_tower": False,
            "freeze_audio_tower": True,
            "freeze_language_model": True,
            "freeze_video_embedder": True,
        },
    )
    assert frozen_names(model) == {
        "audio_tower.weight",
        "audio_tower.bias",
        "language_model.embed_tokens.weight",
        "language_model.layers.0.weight",
        "language_model.layers.0.bias",
        "patch_generator.video_embedder.weight",
        "patch_generator.video_embedder.bias",
    }


def test_embeddings_patterns_and_unfreeze():
    model = ToyVLM()
    apply_parameter_freezing(
        model,
        {
            "freeze_vision_tower": False,
            "freeze_embeddings": True,
            "patterns": [r"^lm_head\.", "projector"],
            "unfreeze_patterns": [r"lm_head\.bias$"],
        },
    )
    assert frozen_names(model) == {
        "language_model.embed_tokens.weight",
        "lm_head.weight",
        "multi_modal_projector.weight",
        "multi_modal_projector.bias",
    }


def test_embeddings_without_accessor_freezes_every_embedding():
    model = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 2), nn.Embedding(3, 2))
    apply_parameter_freezing(model, {"freeze_vision_tower": False, "freeze_embeddings": True})
    assert frozen_names(model) == {"0.weight", "2.weight"}


def test_unknown_key_names_it_and_lists_accepted():
    with pytest.raises(ValueError) as info:
        apply_parameter_freezing(ToyVLM(), {"freeze_vision": True, "freeze_audio_tower": True})
    message = str(info.value)
    assert "['freeze_vision']" in message
    for key in FREEZE_CONFIG_KEYS:
        assert key in message


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"freeze_embeddings": "yes"}, "freeze_embeddings.*must be a bool"),
        ({"patterns": "lm_head"}, "patterns.*list of regex"),
        ({"unfreeze_patterns": [3]}, "unfreeze_patterns.*list of regex"),
        ({"patterns": ["("]}, "invalid regex '\\('"),
    ],
)
def test_bad_values(config, match):
    with pytest.raises(ValueError, match=match):
        apply_parameter_freezing(ToyVLM(), config)


def test_non_mapping_config():
    with pytest.raises(TypeError, match="must be a mapping"):
        apply_parameter_freezing(ToyVLM(), ["freeze_vision_tower"])
    model = ToyVLM()
    apply_parameter_freezing(model, None)  # None means the defaults
    assert frozen_names(model) == {"vision_tower.weight", "vision_tower.bias"}


def test_freeze_by_attribute_and_patterns_helper():
    model = ToyVLM()
    _freeze_module_by_attribute_and_patterns(model, "audio_tower", ["video"])
    assert frozen_names(model) == {
        "audio_tower.weight",
        "audio_tower.bias",
        "patch_generator.video_embedder.weight",
        "patch_generator.video_embedder.bias",
    }


class LookalikeNames(nn.Module):
    """Towers under the names real VLMs use, beside modules whose names merely contain a tower
    word inside a component (`revision`, `division_head`, `context_proj`, `subtext`)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.vision_model = nn.Linear(2, 2)  # Idefics / SmolVLM
        self.model.visual = nn.Linear(2, 2)  # Qwen2-VL
        self.model.text_model = nn.Linear(2, 2)  # Idefics / SmolVLM
        self.model.audio_tower = nn.Linear(2, 2)  # Gemma 4
        self.model.revision = nn.Linear(2, 2)
        self.division_head = nn.Linear(2, 2)
        self.context_proj = nn.Linear(2, 2)
        self.subtext = nn.Linear(2, 2)
        self.naudio = nn.Linear(2, 2)


def _frozen_modules(model: nn.Module) -> set[str]:
    return {name.rpartition(".")[0] for name in frozen_names(model)}


def test_tower_words_match_name_components_not_substrings():
    everything = {"freeze_audio_tower": True, "freeze_language_model": True}
    model = LookalikeNames()
    apply_parameter_freezing(model, everything)
    assert _frozen_modules(model) == {
        "model.vision_model",
        "model.visual",
        "model.text_model",
        "model.audio_tower",
    }
    vision_only = LookalikeNames()
    apply_parameter_freezing(vision_only, {})
    assert _frozen_modules(vision_only) == {"model.vision_model", "model.visual"}


# --- KV sharing on a real transformers Gemma 4 text model -------------------------------------


def tiny_gemma4_config(num_kv_shared_layers: int = 2) -> Gemma4TextConfig:
    return Gemma4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        num_kv_shared_layers=num_kv_shared_layers,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=8,
        enable_moe_block=False,
    )


def add_released_checkpoint_kv(model: Gemma4ForCausalLM) -> set[str]:
    """transformers drops the k/v modules of KV-shared layers, but released checkpoints (and
    models keeping that layout) carry them; attach them as such a model would hold them."""
    config = model.config
    added = set()
    for idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if not attn.is_kv_shared_layer:
            continue
        kv_dim = config.num_key_value_heads * attn.head_dim
        attn.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        attn.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        attn.k_norm = Gemma4RMSNorm(attn.head_dim, eps=config.rms_norm_eps)
        attn.v_norm = Gemma4RMSNorm(attn.head_dim, eps=config.rms_norm_eps, with_scale=False)
        prefix = f"model.layers.{idx}.self_attn"
        added |= {f"{prefix}.k_proj.weight", f"{prefix}.v_proj.weight", f"{prefix}.k_norm.weight"}
    return added


def params_without_grad(model: nn.Module) -> set[str]:
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([[1, 7, 3, 9, 11, 2], [5, 4, 63, 0, 8, 8]])
    model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


def test_kv_sharing_freezes_exactly_the_dead_params():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config()).train()
    dead = add_released_checkpoint_kv(model)
    assert len(dead) == 6  # layers 2 and 3: k_proj, v_proj, k_norm

    # Before freezing, exactly those get no gradient from a backward pass.
    assert params_without_grad(model) == dead

    frozen = freeze_unused_kv_sharing_params(model)
    assert set(frozen) == dead == frozen_names(model)
    assert params_without_grad(model) == set()  # every trainable param now gets a gradient
    optimizer_params = [p for p in model.parameters() if p.requires_grad]
    assert len(optimizer_params) == len(list(model.parameters())) - 6


def test_kv_sharing_on_transformers_layout_and_noops():
    model = Gemma4ForCausalLM(tiny_gemma4_config())
    assert freeze_unused_kv_sharing_params(model) == []  # transformers holds no dead k/v
    assert frozen_names(model) == set()

    unshared = Gemma4ForCausalLM(tiny_gemma4_config(num_kv_shared_layers=0))
    assert freeze_unused_kv_sharing_params(unshared) == []
    assert freeze_unused_kv_sharing_params(nn.Linear(2, 2)) == []


def _fake_layers(n: int) -> nn.Module:
    layers = nn.ModuleList()
    for _ in range(n):
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.k_proj = nn.Linear(2, 2, bias=False)
        layer.self_attn.q_proj = nn.Linear(2, 2, bias=False)
        layers.append(layer)
    return layers


def test_kv_sharing_uses_text_config_and_skips_towers():
    model = nn.Module()
    model.config = SimpleNamespace(
        text_config=SimpleNamespace(num_kv_shared_layers=1, num_hidden_layers=3)
    )
    model.language_model = nn.Module()
    model.language_model.layers = _fake_layers(3)
    model.vision_tower = nn.Module()
    model.vision_tower.layers = _fake_layers(3)
    assert freeze_unused_kv_sharing_params(model) == [
        "language_model.layers.2.self_attn.k_proj.weight"
    ]


def test_pipeline_part_with_sparse_layer_indices():
    part = nn.Module()
    part.config = SimpleNamespace(num_kv_shared_layers=2, num_hidden_layers=6)
    part.layers = nn.ModuleDict({"3": _fake_layers(1)[0], "4": _fake_layers(1)[0]})
    assert freeze_unused_kv_sharing_params(part) == ["layers.4.self_attn.k_proj.weight"]


# --- indexers -----------------------------------------------------------------------------------


def _indexer_model(model_type: str, path: str) -> nn.Module:
    model = nn.Module()
    model.config = SimpleNamespace(model_type=model_type)
    model.layers = nn.ModuleList([nn.Module()])
    attn = nn.Module()
    model.layers[0].self_attn = attn
    owner = attn
    for part in path.split("."):
        child = nn.Module()
        setattr(owner, part, child)
        owner = child
    owner.proj = nn.Linear(2, 2)
    attn.q_proj = nn.Linear(2, 2)
    return model


def test_deepseek_v4_indexer():
    model = _indexer_model("deepseek_v4", "compressor.indexer")
    frozen = freeze_deepseek_v4_indexer_params(model)
    assert (
        set(frozen)
        == frozen_names(model)
        == {
            "layers.0.self_attn.compressor.indexer.proj.weight",
            "layers.0.self_attn.compressor.indexer.proj.bias",
        }
    )
    other = _indexer_model("deepseek_v3", "compressor.indexer")
    assert freeze_deepseek_v4_indexer_params(other) == [] and frozen_names(other) == set()


def test_minimax_m3_indexer():
    model = _indexer_model("minimax_m3_vl", "indexer")
    frozen = freeze_minimax_m3_indexer_params(model)
    assert set(frozen) == {
        "layers.0.self_attn.indexer.proj.weight",
        "layers.0.self_attn.indexer.proj.bias",
    }
    other = _indexer_model("minimax_m2", "indexer")
    assert freeze_minimax_m3_indexer_params(other) == []


def test_kv_sharing_skips_towers_by_component_only():
    model = nn.Module()
    model.config = SimpleNamespace(num_kv_shared_layers=1, num_hidden_layers=2)
    model.revision = nn.Module()  # the text decoder, under a name containing "vision"
    model.revision.layers = _fake_layers(2)
    model.visual = nn.Module()
    model.visual.layers = _fake_layers(2)
    assert freeze_unused_kv_sharing_params(model) == ["revision.layers.1.self_attn.k_proj.weight"]
