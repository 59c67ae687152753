"""HFCheckpointingMixin against transformers: both directions, sharded and tied checkpoints,
and the key-mismatch errors. A tiny Llama (hidden 32, 2 layers, vocab 64) in fp32 on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from am_utils.checkpointing import (
    CheckpointLoadError,
    HFCheckpointingMixin,
    parse_shard_size,
    read_hf_state_dict,
)


def tiny_llama_config(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


class PrefixAdapter:
    """Toy state-dict adapter: the native model names its parts differently from HF.
    Keys matching no prefix pass through unchanged."""

    _NATIVE_TO_HF = (
        ("tok_embeddings.", "model.embed_tokens."),
        ("layers.", "model.layers."),
        ("norm.", "model.norm."),
        ("output.", "lm_head."),
    )

    def __init__(self):
        self.calls = {"to_hf": 0, "from_hf": 0}

    @staticmethod
    def _rename(key: str, pairs) -> str:
        for src, dst in pairs:
            if key.startswith(src):
                return dst + key[len(src) :]
        return key

    def to_hf(self, state_dict):
        self.calls["to_hf"] += 1
        return {self._rename(k, self._NATIVE_TO_HF): v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict, device_mesh=None):
        self.calls["from_hf"] += 1
        pairs = [(hf, native) for native, hf in self._NATIVE_TO_HF]
        return {self._rename(k, pairs): v for k, v in hf_state_dict.items()}


class NativeLlama(HFCheckpointingMixin, nn.Module):
    """A 'native' model: transformers' Llama layers under other names, own forward."""

    config_class = LlamaConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        hf = LlamaForCausalLM(config)
        self.tok_embeddings = hf.model.embed_tokens
        self.layers = hf.model.layers
        self.norm = hf.model.norm
        self.rotary = hf.model.rotary_emb
        self.output = hf.lm_head
        self.state_dict_adapter = PrefixAdapter()

    def forward(self, input_ids):
        hidden = self.tok_embeddings(input_ids)
        position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
            )
        return self.output(self.norm(hidden))


class MixinLlama(HFCheckpointingMixin, LlamaForCausalLM):
    """transformers' own class with the mixin's save/load (HF layout, no adapter)."""


INPUT_IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7], [3, 3, 8, 21, 34, 55, 0, 1]])


def hf_logits(model: LlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def native_logits(model: NativeLlama) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS)


def test_native_forward_matches_transformers_on_shared_weights():
    torch.manual_seed(0)
    native = NativeLlama(tiny_llama_config()).eval()
    hf = LlamaForCausalLM(native.config).eval()
    hf.load_state_dict(native.state_dict_adapter.to_hf(native.state_dict()))
    assert torch.equal(native_logits(native), hf_logits(hf))


@pytest.mark.parametrize("tie", [False, True])
def test_our_save_loads_in_transformers(tmp_path, tie):
    torch.manual_seed(0)
    native = NativeLlama(tiny_llama_config(tie)).eval()
    native.save_pretrained(tmp_path)
    assert native.state_dict_adapter.calls["to_hf"] == 1
    assert (tmp_path / "config.json").is_file()
    on_disk = load_file(tmp_path / "model.safetensors")
    assert "model.embed_tokens.weight" in on_disk
    assert ("lm_head.weight" in on_disk) is not tie  # tied target is not written
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf_logits(reloaded), native_logits(native))
    if tie:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_transformers_save_loads_through_adapter(tmp_path, tie, max_shard_size):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(tie)).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf.save_pretrained(tmp_path, **kwargs)
    sharded = (tmp_path / "model.safetensors.index.json").is_file()
    assert sharded is (max_shard_size is not None)

    native = NativeLlama.from_pretrained(tmp_path)
    assert native.state_dict_adapter.calls["from_hf"] == 1
    assert not native.training
    assert all(not p.is_meta for p in native.parameters())
    assert torch.equal(native_logits(native), hf_logits(hf))
    assert (native.output.weight is native.tok_embeddings.weight) is tie


def test_mixin_on_transformers_class_round_trip_sharded(tmp_path):
    torch.manual_seed(0)
    hf = MixinLlama(tiny_llama_config(tie=True)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    n = len(shard_files)
    assert n > 1
    assert shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert "lm_head.weight" not in index["weight_map"]
    state = hf.state_dict()
    expected_bytes = sum(
        t.numel() * t.element_size() for k, t in state.items() if k != "lm_head.weight"
    )
    assert index["metadata"]["total_size"] == expected_bytes
    for shard in shard_files:  # every shard respects the limit unless it holds one tensor
        tensors = load_file(tmp_path / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1

    ours = MixinLlama.from_pretrained(tmp_path)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf_logits(ours), hf_logits(hf))
    assert torch.equal(hf_logits(theirs), hf_logits(hf))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight

    # Re-saving as one file removes the stale shards and index.
    ours.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name)
    assert names == ["model.safetensors"]
    assert torch.equal(hf_logits(MixinLlama.from_pretrained(tmp_path)), hf_logits(hf))


def test_gradients_flow_after_load(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config()).train()
    hf.save_pretrained(tmp_path)
    native = NativeLlama.from_pretrained(tmp_path).train()
    native(INPUT_IDS).logsumexp(-1).sum().backward()
    hf(input_ids=INPUT_IDS).logits.logsumexp(-1).sum().backward()
    hf_named = dict(hf.named_parameters())
    native_to_hf = native.state_dict_adapter.to_hf(dict(native.named_parameters()))
    for name, param in native_to_hf.items():
        torch.testing.assert_close(param.grad, hf_named[name].grad, rtol=0, atol=0)


def test_dtype_and_generation_config(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config()).eval()
    hf.generation_config.max_new_tokens = 7
    hf.save_pretrained(tmp_path)
    ours = MixinLlama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.generation_config.max_new_tokens == 7
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight.to(torch.bfloat16))
    ours_str = NativeLlama.from_pretrained(tmp_path, torch_dtype="bfloat16")
    assert ours_str.output.weight.dtype == torch.bfloat16
    assert NativeLlama.from_pretrained(tmp_path, dtype="bf16").output.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="from_pretrained dtype='float7' is not a known floating"):
        NativeLlama.from_pretrained(tmp_path, dtype="float7")

    out = tmp_path / "resaved"
    ours.save_pretrained(out)
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert ours.config.dtype == torch.bfloat16
    assert (
        LlamaForCausalLM.from_pretrained(out, dtype="auto").lm_head.weight.dtype == torch.bfloat16
    )


def _write_hf_checkpoint(tmp_path, mutate):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config())
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    mutate(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return hf


def test_missing_key_error_names_key(tmp_path):
    _write_hf_checkpoint(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointLoadError, match=r"missing keys \(1\).*layers\.1\.mlp\.up_proj"):
        NativeLlama.from_pretrained(tmp_path)


def test_unexpected_key_error_and_ignore_list(tmp_path):
    def add_junk(state):
        state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)

    hf = _write_hf_checkpoint(tmp_path, add_junk)
    with pytest.raises(CheckpointLoadError, match=r"unexpected keys \(1\).*extra_proj"):
        MixinLlama.from_pretrained(tmp_path)

    class Tolerant(MixinLlama):
        _checkpoint_ignore_unexpected_keys = [r"self_attn\.extra_proj\."]

    model = Tolerant.from_pretrained(tmp_path)
    assert torch.equal(hf_logits(model), hf_logits(hf.eval()))


def test_shape_mismatch_error_names_shapes(tmp_path):
    def shrink(state):
        state["model.norm.weight"] = torch.ones(31)

    _write_hf_checkpoint(tmp_path, shrink)
    with pytest.raises(CheckpointLoadError) as info:
        NativeLlama.from_pretrained(tmp_path)
    assert "shape mismatch for norm.weight: model expects [32], checkpoint has [31]" in str(
        info.value
    )


def test_tied_keys_with_different_values_are_rejected(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(tie=True))
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1  # a distinct head
    hf.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointLoadError, match=r"tied keys with different values") as info:
        MixinLlama.from_pretrained(tmp_path)
    assert "lm_head.weight" in str(info.value) and "model.embed_tokens.weight" in str(info.value)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # equal: fine
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    MixinLlama.from_pretrained(tmp_path)


def test_non_strict_initializes_missing_and_reports(tmp_path, caplog):
    hf = _write_hf_checkpoint(tmp_path, lambda s: s.pop("model.layers.0.mlp.down_proj.weight"))
    model = MixinLlama.from_pretrained(tmp_path, strict=False)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert not weight.is_meta and weight.shape == (32, 64) and torch.isfinite(weight).all()
    assert not torch.equal(weight, hf.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(
        model.model.layers[1].mlp.down_proj.weight, hf.model.layers[1].mlp.down_proj.weight
    )
    assert "missing keys" in caplog.text


class WithPersistentBuffer(MixinLlama):
    """A model with a recomputed persistent buffer that checkpoints do not hold."""

    _checkpoint_optional_keys = [r"^step_scale$"]

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("step_scale", torch.full((3,), 0.5), persistent=True)


def test_optional_persistent_buffer(tmp_path):
    _write_hf_checkpoint(tmp_path, lambda s: None)
    model = WithPersistentBuffer.from_pretrained(tmp_path)
    assert torch.equal(model.step_scale, torch.full((3,), 0.5))

    class OptionalParam(MixinLlama):
        _checkpoint_optional_keys = [r"^extra_head\.weight$"]

        def __init__(self, config):
            super().__init__(config)
            self.extra_head = nn.Linear(32, 2, bias=False)

    with_param = OptionalParam.from_pretrained(tmp_path)
    assert not with_param.extra_head.weight.is_meta
    assert torch.isfinite(with_param.extra_head.weight).all()

    class NotDeclared(WithPersistentBuffer):
        _checkpoint_optional_keys = ()

    with pytest.raises(CheckpointLoadError, match="step_scale"):
        NotDeclared.from_pretrained(tmp_path)


def test_pytorch_bin_fallback_and_unsafe_save(tmp_path):
    torch.manual_seed(0)
    native = NativeLlama(tiny_llama_config()).eval()
    native.save_pretrained(tmp_path, safe_serialization=False, max_shard_size="30KB")
    assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    reloaded = NativeLlama.from_pretrained(tmp_path)
    assert torch.equal(native_logits(reloaded), native_logits(native))

    single = tmp_path / "single"
    native.save_pretrained(single, safe_serialization=False)
    assert (single / "pytorch_model.bin").is_file()
    assert set(read_hf_state_dict(single)) == set(
        native.state_dict_adapter.to_hf(native.state_dict())
    )


def test_only_local_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="only local directories"):
        NativeLlama.from_pretrained("meta-llama/Llama-3.2-1B")
    (tmp_path / "config.json").write_text(tiny_llama_config().to_json_string())
    with pytest.raises(FileNotFoundError, match="No weights"):
        NativeLlama.from_pretrained(tmp_path)


def test_save_kwargs_validation(tmp_path):
    native = NativeLlama(tiny_llama_config())
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bogus'\\]"):
        native.save_pretrained(tmp_path, bogus=1)
    with pytest.raises(NotImplementedError, match="push_to_hub"):
        native.save_pretrained(tmp_path, push_to_hub=True)
    native.save_pretrained(tmp_path, is_main_process=False)
    assert not any(tmp_path.iterdir())


def test_meta_tensors_cannot_be_saved(tmp_path):
    from am_utils.init import init_empty_weights

    with init_empty_weights():
        native = NativeLlama(tiny_llama_config())
    with pytest.raises(ValueError, match="meta device"):
        native.save_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (123, 123),
        ("5GB", 5 * 10**9),
        ("10MB", 10**7),
        ("20KB", 20_000),
        ("1GiB", 2**30),
        ("3mib", 3 * 2**20),
        ("8Mb", 10**6),
        ("512", 512),
    ],
)
def test_parse_shard_size(size, expected):
    assert parse_shard_size(size) == expected


@pytest.mark.parametrize("size", [0, -5, "5 parsecs", "GB", "", 1.5, "-3MB"])
def test_parse_shard_size_rejects(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_shard_size(size)


class CopyingAdapter(PrefixAdapter):
    """An adapter that materializes new tensors (as layout conversions do), so tied entries
    reach the writer as equal copies rather than aliases."""

    def to_hf(self, state_dict):
        return {k: v.clone() for k, v in super().to_hf(state_dict).items()}


def test_tied_copies_from_adapter_written_once(tmp_path):
    torch.manual_seed(0)
    native = NativeLlama(tiny_llama_config(tie=True)).eval()
    native.state_dict_adapter = CopyingAdapter()
    native.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf_logits(reloaded), native_logits(native))


def test_views_of_one_storage_are_saved(tmp_path):
    """Entries that view one fused buffer (e.g. split from a fused qkv) must still save."""
    torch.manual_seed(0)
    model = MixinLlama(tiny_llama_config()).eval()
    state = model.state_dict()
    prefix = "model.layers.0.self_attn."
    fused = torch.cat([state[prefix + "q_proj.weight"], state[prefix + "k_proj.weight"]])
    state[prefix + "q_proj.weight"], state[prefix + "k_proj.weight"] = fused.split([32, 16])
    model.save_pretrained(tmp_path, state_dict=state)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf_logits(reloaded), hf_logits(model))


def test_auto_dtype_and_autoconfig(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).eval()
    hf.save_pretrained(tmp_path)

    class AutoConfigNative(NativeLlama):
        config_class = None  # falls back to transformers.AutoConfig

    model = AutoConfigNative.from_pretrained(tmp_path, dtype="auto")
    assert isinstance(model.config, LlamaConfig)
    assert model.output.weight.dtype == torch.bfloat16
    assert torch.equal(native_logits(model), hf_logits(hf))


def test_gemma4_released_layout_with_dead_kv_weights(tmp_path):
    """Gemma 4 E2B-style checkpoints carry k/v weights for KV-shared layers that the model
    does not have; a model declaring them ignorable loads the rest exactly."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM

    config = Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
        num_kv_shared_layers=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=64,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = Gemma4ForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dead = {
        f"model.layers.{i}.self_attn.{name}.weight": torch.randn(16, 32)
        for i in (2, 3)
        for name in ("k_proj", "v_proj")
    }
    save_file({**state, **dead}, tmp_path / "model.safetensors", metadata={"format": "pt"})

    class StrictGemma4(HFCheckpointingMixin, Gemma4ForCausalLM):
        pass

    class Gemma4(HFCheckpointingMixin, Gemma4ForCausalLM):
        _checkpoint_ignore_unexpected_keys = [
            r"layers\.\d+\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\."
        ]

    with pytest.raises(CheckpointLoadError, match=r"unexpected keys \(4\)"):
        StrictGemma4.from_pretrained(tmp_path)
    model = Gemma4.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=INPUT_IDS).logits, reference(input_ids=INPUT_IDS).logits)
