"""Dense K/V-sharing (E2B-like) parity: released-checkpoint dead K/V weights, use_cache=False
in eval / train / activation checkpointing, generation; the K/V stores' roles."""

from __future__ import annotations

import logging

import pytest
import torch
from _gemma4_helpers import (
    TEXT_VOCAB,
    cpu_backend,
    gemma4_config,
    randomize_hf,
    rel_err,
    tiny_kv_shared_text,
)
from safetensors.torch import load_file, save_file
from torch.distributed.utils import _apply_to_tensors
from transformers import Gemma4ForConditionalGeneration as HFGemma4

from am_models_gemma4 import (
    Gemma4ForConditionalGeneration,
    _FSDPSafeSharedKVStates,
    _Gemma4KVShareHolder,
    _kv_sharing_active,
)
from am_utils import freeze_unused_kv_sharing_params
from am_utils.checkpointing import CheckpointLoadError

SHARED = (3, 4)  # the last num_kv_shared_layers=2 of 5 layers


def _dead_kv(text, layer: int, gen) -> dict[str, torch.Tensor]:
    """What a released E2B/E4B checkpoint stores for a K/V-shared layer's unused K/V."""
    layer_config = text.per_layer_config[layer]
    head_dim = layer_config.head_dim
    kv = layer_config.num_key_value_heads * head_dim
    p = f"model.language_model.layers.{layer}.self_attn."
    return {
        p + "k_proj.weight": torch.randn(kv, text.hidden_size, generator=gen),
        p + "v_proj.weight": torch.randn(kv, text.hidden_size, generator=gen),
        p + "k_norm.weight": torch.randn(head_dim, generator=gen),
    }


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A transformers E2B-like model saved, plus the dead K/V keys a released checkpoint has."""
    torch.manual_seed(0)
    hf = randomize_hf(HFGemma4(gemma4_config(tiny_kv_shared_text()))).eval()
    path = tmp_path_factory.mktemp("hf_gemma4_e2b")
    hf.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    text = hf.config.text_config
    for layer in SHARED:
        weights.update(_dead_kv(text, layer, gen))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return hf, path


def _batch(seed=1, batch=2, seq=14):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TEXT_VOCAB, (batch, seq), generator=gen)
    return ids, ids.clone()


def _reference_loss(hf, ids, labels) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids, labels=labels, use_cache=True).loss


def test_dead_kv_keys_are_dropped_with_one_log_and_loss_matches(released, caplog):
    hf, path = released
    assert _kv_sharing_active(hf.config.text_config)
    with caplog.at_level(logging.INFO, logger="am_models_gemma4.state_dict_adapter"):
        ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    drops = [r for r in caplog.records if "K/V-shared layers" in r.getMessage()]
    assert len(drops) == 1 and "layers.3.self_attn.k_proj.weight" in drops[0].getMessage()
    ids, labels = _batch()
    expected = _reference_loss(hf, ids, labels)
    with torch.no_grad():
        eval_loss = ours(ids, labels=labels, use_cache=False).loss
        assert rel_err(ours(ids, use_cache=False).logits, hf(ids, use_cache=True).logits) <= 1e-5
    ours.train()
    train_loss = ours(ids, labels=labels, use_cache=False).loss
    assert abs(eval_loss.item() - expected.item()) <= 1e-5 * expected.item()
    assert abs(train_loss.item() - expected.item()) <= 1e-5 * expected.item()


def test_other_unexpected_keys_still_fail(released, tmp_path):
    hf, path = released
    weights = load_file(path / "model.safetensors")
    weights["model.language_model.layers.1.self_attn.bogus.weight"] = torch.zeros(2)
    # a k_proj of a layer that is NOT K/V-shared and has none (layer 2 uses k_eq_v? no:
    # dense here, so use a non-existent layer index instead)
    weights["model.language_model.layers.9.self_attn.k_proj.weight"] = torch.zeros(2)
    hf.config.save_pretrained(tmp_path)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointLoadError) as err:
        Gemma4ForConditionalGeneration.from_pretrained(tmp_path, backend=cpu_backend())
    assert "layers.1.self_attn.bogus.weight" in str(err.value)
    assert "layers.9.self_attn.k_proj.weight" in str(err.value)
    assert "layers.3.self_attn.k_proj" not in str(err.value)  # dead K/V: dropped, not an error


def test_strict_false_still_drops_the_dead_kv_once_and_reports_the_rest(released, tmp_path):
    hf, path = released
    weights = load_file(path / "model.safetensors")
    weights["model.language_model.layers.1.self_attn.bogus.weight"] = torch.zeros(2)
    hf.config.save_pretrained(tmp_path)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    try:
        ours = Gemma4ForConditionalGeneration.from_pretrained(
            tmp_path, backend=cpu_backend(), strict=False
        )
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    drops = [r for r in records if "K/V-shared layers" in r.getMessage()]
    warnings = "\n".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
    assert len(drops) == 1
    assert "layers.1.self_attn.bogus.weight" in warnings
    assert "k_proj" not in warnings  # the dead K/V keys are not "unexpected"
    ids, labels = _batch()
    with torch.no_grad():
        loss = ours(ids, labels=labels, use_cache=False).loss
    expected = _reference_loss(hf, ids, labels)
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_activation_checkpointing_keeps_kv_sharing(released):
    hf, path = released
    ids, labels = _batch(seed=2)
    expected = _reference_loss(hf, ids, labels)
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend()).train()
    plain = ours(ids, labels=labels, use_cache=False)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    ours.gradient_checkpointing_enable({"use_reentrant": False})
    ckpt = ours(ids, labels=labels, use_cache=False)
    ckpt.loss.backward()
    assert abs(ckpt.loss.item() - expected.item()) <= 1e-5 * expected.item()
    for name, grad in grads.items():
        assert rel_err(dict(ours.named_parameters())[name].grad, grad) <= 1e-5, name


def test_shared_layers_recomputing_their_own_kv_give_a_different_loss(released):
    """The failure K/V sharing must never fall back to: shared layers computing K/V with the
    dead weights of the checkpoint (what older transformers did under use_cache=False)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    hf, path = released
    ids, labels = _batch(seed=3)
    expected = _reference_loss(hf, ids, labels)
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    text = ours.config.text_config
    dead = load_file(path / "model.safetensors")
    for i in SHARED:
        attn = ours.model.layers[i].self_attn
        p = f"model.language_model.layers.{i}.self_attn."
        attn.is_kv_shared_layer = False
        for name in ("k_proj", "v_proj"):
            weight = dead[p + name + ".weight"]
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data.copy_(weight)
            setattr(attn, name, linear)
        attn.k_norm = Gemma4RMSNorm(attn.head_dim, eps=text.rms_norm_eps)
        attn.k_norm.weight.data.copy_(dead[p + "k_norm.weight"])
        attn.v_norm = Gemma4RMSNorm(attn.head_dim, eps=text.rms_norm_eps, with_scale=False)
    with torch.no_grad():
        wrong = ours(ids, labels=labels, use_cache=False)
        reference = hf(ids, use_cache=True).logits
    assert rel_err(wrong.logits, reference) > 0.05
    # 100x the 1e-5 parity tolerance of the sharing tests above
    assert abs(wrong.loss.item() - expected.item()) > 1e-3 * expected.item()


def test_generate_16_tokens_equals_transformers(released):
    hf, path = released
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    prompt, _ = _batch(seed=4, seq=5)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=16, do_sample=False)
        got = ours.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)


def test_freeze_unused_kv_sharing_params_finds_no_dead_modules(released):
    """transformers 5.23's shared layers have no k/v modules, so nothing is left to freeze."""
    _, path = released
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    assert freeze_unused_kv_sharing_params(ours) == []
    assert not any(
        f"layers.{i}.self_attn.k_proj" in n for n, _ in ours.named_parameters() for i in SHARED
    )


def test_transformers_needs_no_holder_but_accepts_one(released):
    """5.23 reads the shared K/V without a cache (use_cache=False equals use_cache=True); the
    cache-free holder passed as past_key_values gives the same loss."""
    hf, _ = released
    ids, labels = _batch(seed=5)
    expected = _reference_loss(hf, ids, labels)
    with torch.no_grad():
        no_cache = hf(ids, labels=labels, use_cache=False).loss
        held = hf(ids, labels=labels, use_cache=False, past_key_values=_Gemma4KVShareHolder()).loss
    assert torch.allclose(no_cache, expected, rtol=1e-6)
    assert torch.allclose(held, expected, rtol=1e-6)


def test_fsdp_input_cast_keeps_the_safe_store_one_object():
    """FSDP2's forward-input cast rebuilds plain dicts (a layer would see a copy) but passes
    _FSDPSafeSharedKVStates through as the same object."""
    k = torch.ones(1, 1, 2, 2)
    plain = {"sliding_attention": (k, k)}
    safe = _FSDPSafeSharedKVStates()
    safe["sliding_attention"] = (k, k)
    cast = _apply_to_tensors(lambda t: t.to(torch.bfloat16), {"a": plain, "b": safe})
    assert cast["a"] is not plain
    assert cast["b"] is safe
    with pytest.raises(KeyError, match="source layer"):
        _FSDPSafeSharedKVStates()["full_attention"]
