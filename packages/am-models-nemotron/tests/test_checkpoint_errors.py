"""from_pretrained on Nemotron-H checkpoints that do not fit the model: every tensor the model
would not use, every missing or mis-shaped expert tensor and a config of another model type
is a CheckpointLoadError naming it; strict=False loads, logs and re-initializes. Checkpoints
are written by transformers' own NemotronH (per-expert on-disk layout), then edited."""

from __future__ import annotations

import shutil

import pytest
import torch
from _nemotron_helpers import cpu_backend, randomize_hf, tiny_config
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers import NemotronHForCausalLM as HFNemotronH

from am_models_nemotron import NemotronHForCausalLM
from am_utils.checkpointing import CheckpointLoadError, read_hf_state_dict

MOE = "backbone.layers.1.mixer."  # the tiny pattern's first MoE block (4 relu2 experts)
LAST_MOE = "backbone.layers.5.mixer."


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize_hf(HFNemotronH(tiny_config())).eval()
    path = tmp_path_factory.mktemp("hf_nemotron")
    hf.save_pretrained(path)
    return path, read_hf_state_dict(path)


def _edited(written, tmp_path, edit):
    """A copy of the transformers checkpoint with its tensors changed by ``edit(sd)``."""
    source, tensors = written
    sd = dict(tensors)
    edit(sd)
    for name in ("config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, tmp_path / name)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def _load(path, **kwargs):
    return NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend(), **kwargs)


def test_unedited_checkpoint_loads(written):
    assert _load(written[0]) is not None
    assert f"{MOE}experts.3.up_proj.weight" in written[1]  # the layout the edits assume


def test_expert_beyond_the_model_count_is_rejected(written, tmp_path):
    def extra_expert(sd):
        sd[f"{MOE}experts.4.up_proj.weight"] = sd[f"{MOE}experts.0.up_proj.weight"].clone()
        sd[f"{MOE}experts.4.down_proj.weight"] = sd[f"{MOE}experts.0.down_proj.weight"].clone()

    with pytest.raises(CheckpointLoadError, match=r"unexpected keys \(2\)") as info:
        _load(_edited(written, tmp_path, extra_expert))
    assert f"{MOE}experts.4.up_proj.weight" in str(info.value)


def test_gate_proj_in_a_relu2_model_is_rejected(written, tmp_path):
    def gate_proj(sd):
        sd[f"{MOE}experts.0.gate_proj.weight"] = sd[f"{MOE}experts.0.up_proj.weight"].clone()

    with pytest.raises(CheckpointLoadError, match=r"unexpected keys \(1\)") as info:
        _load(_edited(written, tmp_path, gate_proj))
    assert f"{MOE}experts.0.gate_proj.weight" in str(info.value)


def test_missing_expert_tensor_is_named(written, tmp_path):
    path = _edited(written, tmp_path, lambda sd: sd.pop(f"{MOE}experts.2.down_proj.weight"))
    with pytest.raises(CheckpointLoadError, match="missing") as info:
        _load(path)
    assert f"{MOE}experts.2.down_proj.weight" in str(info.value)


def test_misshaped_expert_tensor_is_named_with_its_shape(written, tmp_path):
    def misshape(sd):
        sd[f"{MOE}experts.3.up_proj.weight"] = torch.zeros(17, 32)

    with pytest.raises(CheckpointLoadError) as info:
        _load(_edited(written, tmp_path, misshape))
    assert f"{MOE}experts.3.up_proj.weight: shape [17, 32], other experts" in str(info.value)


def test_strict_false_loads_what_fits_logs_the_rest_and_reinitializes(written, tmp_path, caplog):
    def damage(sd):
        sd[f"{MOE}experts.4.up_proj.weight"] = torch.zeros(16, 32)
        del sd[f"{LAST_MOE}experts.1.up_proj.weight"]

    path = _edited(written, tmp_path, damage)
    with caplog.at_level("WARNING"):
        model = _load(path, strict=False)
    assert f"{MOE}experts.4.up_proj.weight" in caplog.text
    assert "layers.5.mixer.experts.1.up_proj.weight" in caplog.text
    state = model.state_dict()
    reference = model.state_dict_adapter.from_hf(written[1])
    for name, tensor in reference.items():
        if not name.startswith("model.layers.5.mixer.experts."):
            assert torch.equal(state[name], tensor), name
    fresh = state["model.layers.5.mixer.experts.gate_and_up_projs"]
    assert not fresh.is_meta and torch.isfinite(fresh).all() and fresh.abs().sum() > 0
    assert not torch.equal(fresh, reference["model.layers.5.mixer.experts.gate_and_up_projs"])


def test_config_of_another_model_type_is_rejected(written, tmp_path):
    path = _edited(written, tmp_path, lambda sd: None)
    LlamaConfig(hidden_size=32, num_attention_heads=4, vocab_size=64).save_pretrained(path)
    with pytest.raises(CheckpointLoadError, match=r"type \['llama'\].*'nemotron_h'"):
        _load(path)
    with pytest.raises(CheckpointLoadError, match=r"'llama'.*'nemotron_h'"):
        _load(path, dtype="bfloat16")  # the override path that reads the config itself


def test_expert_tensors_in_a_dense_checkpoint_are_rejected(tmp_path):
    torch.manual_seed(0)
    dense = HFNemotronH(tiny_config(pattern=["linear_attention", "full_attention", "mlp"]))
    dense.save_pretrained(tmp_path)
    sd = read_hf_state_dict(tmp_path)
    sd["backbone.layers.2.mixer.experts.0.up_proj.weight"] = torch.zeros(16, 32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointLoadError, match=r"unexpected keys \(1\)") as info:
        _load(tmp_path)
    assert "backbone.layers.2.mixer.experts.0.up_proj.weight" in str(info.value)
