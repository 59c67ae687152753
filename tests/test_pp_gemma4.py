"""am-pp on our am-models-gemma4 Gemma 4 (am-moe MoE backbone, or an E2B-like dense one with
per-layer inputs and K/V sharing; vision tower): stages chained in one process equal the
model's own forward, logits and every gradient, with an image.

am-pp does not depend on am-models-gemma4, so this cross-package test lives here. The
model's `model_type` is "gemma4", so `patch_hf_model_for_pp` gives it the Gemma 4 VLM
forward; its MoE decoder layers take the same keywords as transformers' (the spawned
2-process runs of the same forwards are in packages/am-pp/tests/test_distributed.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from am_dtype.backend import BackendConfig
from am_pp import generate_stage_module_names, split_model_into_stages

VOCAB, IMAGE = 128, 127


# The MoE text config (am-moe experts) and an E2B-like dense one (transformers' own
# Gemma4TextModel inside our model): per-layer inputs, and layers 2-3 share the K/V of
# layers 0-1, across every stage boundary of a 2- or 4-stage split.
_TEXT = {
    "moe": dict(
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
        hidden_size_per_layer_input=0,
    ),
    "e2b": dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                num_kv_shared_layers=2),
}  # fmt: skip


def _model(kind: str = "moe"):
    from transformers import Gemma4Config

    from am_models_gemma4 import Gemma4ForConditionalGeneration

    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=30.0, initializer_range=0.2, dtype="float32", **_TEXT[kind],
    )  # fmt: skip
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, patch_size=2, pooling_kernel_size=2,
        position_embedding_size=64, dtype="float32",
    )  # fmt: skip
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, dtype="float32",
        image_token_id=IMAGE, boi_token_id=VOCAB - 2, eoi_token_id=VOCAB - 3,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    backend = BackendConfig(attn="sdpa", linear="torch", rms_norm="torch_fp32")
    model = Gemma4ForConditionalGeneration(config, backend=backend)
    model.initialize_weights()
    return model.float().train()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB - 3, (2, 12), generator=g)
    ids[0, 2:6] = IMAGE  # one image: 4x4 patches pooled 2x2 -> 4 soft tokens
    pixels = torch.rand(1, 16, 12, generator=g)
    xy = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1)
    return ids, {"pixel_values": pixels, "image_position_ids": xy.reshape(1, 16, 2)}


@pytest.mark.parametrize("kind", sorted(_TEXT))
@pytest.mark.parametrize("num_stages", [2, 4])
def test_am_gemma4_stages_equal_the_model(num_stages, kind):
    model = _model(kind)
    ids, images = _batch()
    ref = model(ids, **images).logits
    target = F.pad(ids[:, 1:], (0, 1), value=-100)
    F.cross_entropy(ref.flatten(0, 1), target.flatten()).backward()
    stages = split_model_into_stages(
        model, generate_stage_module_names(model, num_stages), range(num_stages)
    )
    h = stages[0](ids, **images)
    for stage in stages[1:]:  # (h, per-layer inputs, shared K/V ...) travel positionally
        h = stage(*h) if isinstance(h, tuple) else stage(h)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
    F.cross_entropy(h.flatten(0, 1), target.flatten()).backward()
    ref_params = dict(model.named_parameters())
    seen = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(seen) == sorted(ref_params)
    for stage in stages:
        for name, p in stage.named_parameters():
            want = ref_params[name].grad
            if want is None:
                assert p.grad is None or not p.grad.any(), name
            else:
                torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=name)
    # The image reached the logits through stage 0's vision merge.
    assert any(n.startswith("model.vision_tower.") and ref_params[n].grad is not None for n in seen)


def test_am_gemma4_moe_padding_reaches_every_stage():
    """Left padding differing per row: every stage gets the mask (and our MoE layers the
    padding mask that keeps padded tokens out of the experts, as the model's own forward
    does); the real tokens' logits equal the model's own padded ones."""
    model = _model("moe")
    ids, _ = _batch()
    ids = ids.masked_fill(ids == IMAGE, 7)
    mask = torch.ones_like(ids)
    mask[0, :3], mask[1, :5] = 0, 0
    seen = []
    for layer in model.model.language_model.layers:
        layer.moe.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(kw.get("padding_mask")), with_kwargs=True
        )
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        stages = split_model_into_stages(model, generate_stage_module_names(model, 2), range(2))
        seen.clear()  # the copies carry the hooks: count the pipeline's calls only
        out = stages[1](*stages[0](ids, attention_mask=mask))
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    assert len(seen) == 4 and all(p is not None and torch.equal(p, ~real) for p in seen)
