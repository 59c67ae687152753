"""am_pp.hf_utils against transformers: patched forwards, detection, validation, buffers.

Every model is a tiny transformers model in fp32 (tests/_pp_models.py). The patched
forwards must reproduce transformers' logits exactly, also when the model is cut into
stages and the stages are chained by hand in one process (hidden states passed
positionally, as PipelineStage does), and gradients through the chain must equal those of
the unsplit model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _pp_models import CASES, IGNORE_INDEX, batch, llama, mistral3
from torch import nn

from am_pp import hf_utils
from am_pp.hf_utils import (
    get_text_module,
    init_hf_model_buffers,
    model_keeps_self_forward,
    patch_hf_model_for_pp,
    validate_hf_model_for_pipeline_support,
)
from am_pp.split import generate_stage_module_names, materialize_stage, split_model_into_stages

MODELS = sorted(CASES)


def _hf_logits(model, data):
    return model(input_ids=data["input_ids"], **data["image_kwargs"]).logits


def _chain(stages, data):
    """Run stages in order in one process, the first with the images of the whole batch."""
    out = stages[0](data["input_ids"], **data["image_kwargs"])
    for stage in stages[1:]:  # a tuple travels positionally, as PipelineStage passes it
        out = stage(*out) if isinstance(out, tuple) else stage(out)
    return out


def _loss(logits, labels):
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("name", MODELS)
def test_patched_model_matches_transformers(name):
    model = CASES[name]()
    data = batch(name, 4, 2)
    patched = copy.deepcopy(model)
    patch_hf_model_for_pp(patched)
    got = patched(data["input_ids"], **data["image_kwargs"])  # a tensor, not a ModelOutput
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, _hf_logits(model, data), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_stages", [2, 4])
def test_chained_stages_match_transformers_logits_and_grads(name, num_stages):
    model = CASES[name]()
    data = batch(name, 4, 2)
    ref = _hf_logits(model, data)
    _loss(ref, data["labels"]).backward()
    names = generate_stage_module_names(model, num_stages)
    stages = split_model_into_stages(model, names, range(num_stages))
    got = _chain(stages, data)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    _loss(got, data["labels"]).backward()
    ref_grads = dict(model.named_parameters())
    seen = set()
    for stage in stages:
        for pname, p in stage.named_parameters():
            assert pname not in seen, f"{pname} on two stages"
            seen.add(pname)
            want = ref_grads[pname].grad
            if want is None:
                assert p.grad is None or not p.grad.any(), pname
            else:
                torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7, msg=pname)
    assert seen == set(ref_grads), set(ref_grads) ^ seen


@pytest.mark.parametrize("name", ["mistral3", "gemma4_vlm"])
def test_vlm_first_stage_merges_image_features(name):
    """Image tokens take the vision tower's features, not their text embedding: the logits
    change with the pixels, and only at and after the image tokens' rows."""
    model = CASES[name]()
    data = batch(name, 4, 2)
    patched = copy.deepcopy(model)
    patch_hf_model_for_pp(patched)
    with torch.no_grad():
        base = patched(data["input_ids"], **data["image_kwargs"])
        other = dict(data["image_kwargs"], pixel_values=data["image_kwargs"]["pixel_values"] + 1)
        moved = patched(data["input_ids"], **other)
        no_image = patched(data["input_ids"])  # placeholders embedded as text
    changed_rows = (moved - base).abs().amax(dim=(1, 2)) > 1e-4
    assert changed_rows.tolist() == [True, False, True, False]
    assert (no_image - base).abs().max() > 1e-3
    # Pre-chunked images (the training loop's `_vlm_<name>_chunks`) give the same result.
    for key, value in data["image_kwargs"].items():
        setattr(patched, f"_vlm_{key}_chunks", [value])
    with torch.no_grad():
        torch.testing.assert_close(patched(data["input_ids"]), base, rtol=0, atol=0)


def test_stage_forward_rejects_inputs_it_would_drop():
    patched = llama()
    patch_hf_model_for_pp(patched)
    ids = torch.randint(6, 90, (2, 5))
    with pytest.raises(TypeError, match="labels"):
        patched(ids, labels=ids)
    with pytest.raises(TypeError, match="output_attentions"):
        patched(ids, output_attentions=True)
    names = generate_stage_module_names(llama(), 2)
    later = split_model_into_stages(llama(), names, [1])[0]
    with pytest.raises(ValueError, match="no embed_tokens"):
        later(ids)


def test_bare_decoder_gets_the_inner_forward():
    model = llama()
    bare = copy.deepcopy(model.model)
    patch_hf_model_for_pp(bare)
    ids = torch.randint(6, 90, (2, 7))
    torch.testing.assert_close(bare(ids), model.model(ids).last_hidden_state, rtol=0, atol=0)


def test_registry_keyed_by_model_type():
    calls = []

    def outer():
        def forward(self, input_ids=None, **kwargs):
            calls.append(type(self).__name__)
            return self.lm_head(self.model(input_ids))

        return forward

    hf_utils.register_pp_forwards("llama", hf_utils.create_pipeline_forward_inner, outer)
    try:
        model = llama()
        patch_hf_model_for_pp(model)
        model(torch.randint(6, 90, (1, 4)))
    finally:
        del hf_utils._PP_FORWARDS["llama"]
    assert calls == ["LlamaForCausalLM"]


def test_get_text_module_and_vlm_detection():
    vlm = mistral3()
    text = vlm.model.language_model
    assert get_text_module(vlm) is text  # outer: model.model.language_model
    assert get_text_module(vlm.model) is text  # Mistral3Model
    for attr in ("text_model", "text_decoder"):
        holder = nn.Module()
        setattr(holder, attr, nn.Linear(2, 2))
        assert get_text_module(holder) is getattr(holder, attr)
    lm = llama()
    assert get_text_module(lm) is lm
    assert hf_utils._is_vlm(vlm) and hf_utils._is_mistral3_vlm(vlm)
    assert not hf_utils._is_vlm(lm) and not hf_utils._is_mistral3_vlm(lm)
    gemma = CASES["gemma4_vlm"]()
    assert hf_utils._is_gemma4_vlm(gemma) and hf_utils._is_vlm(gemma)
    assert not hf_utils._is_gemma4_vlm(CASES["gemma4_moe"]())  # text-only Gemma4ForCausalLM
    # Same structure, other model_type: not Gemma4 (the check is by model_type).
    vlm.config.model_type = "kimi_vl"
    assert not hf_utils._is_gemma4_vlm(vlm) and not hf_utils._is_mistral3_vlm(vlm)
    assert hf_utils._PP_VLM_MODEL_TYPES_WITH_DEDICATED_FORWARD == ("gemma4", "mistral3")
    assert hf_utils.TEXT_MODULE_ATTRS == ("language_model", "text_model", "text_decoder")
    assert "vision_tower" in hf_utils.MULTIMODAL_SUFFIXES


def test_model_keeps_self_forward():
    model = llama()
    assert not model_keeps_self_forward(model)
    model._pp_keep_self_forward = True
    assert model_keeps_self_forward(model)


def test_validate_rejects_tied_embeddings_by_the_governing_flag():
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        validate_hf_model_for_pipeline_support(llama(tie_word_embeddings=True))
    # Mistral3: the top-level flag governs tying; text_config's own flag does not.
    tied = mistral3(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        validate_hf_model_for_pipeline_support(tied)
    untied = mistral3()
    untied.config.text_config.tie_word_embeddings = True
    validate_hf_model_for_pipeline_support(untied)
    # Weights shared by hand, flag off: the weights themselves are checked.
    shared = llama()
    shared.lm_head.weight = shared.model.embed_tokens.weight
    with pytest.raises(ValueError, match="same tensor"):
        validate_hf_model_for_pipeline_support(shared)


def test_validate_rejects_gemma4_state_that_cannot_cross_stages():
    model = CASES["gemma4_e2b"]()  # per-layer inputs and K/V sharing do cross stages
    validate_hf_model_for_pipeline_support(model)
    model.config.use_bidirectional_attention = "vision"
    with pytest.raises(ValueError, match="use_bidirectional_attention='vision'"):
        validate_hf_model_for_pipeline_support(model)


@pytest.mark.parametrize("name", MODELS)
def test_meta_build_restores_every_buffer(name):
    """A stage built on the meta device, given storage and the reference's checkpoint, holds
    the reference's buffers (rotary inv_freq per layer type, Gemma's embed_scale, ...) and
    gives its logits; without init_hf_model_buffers the non-persistent ones stay wrong."""
    ref = CASES[name]()
    data = batch(name, 2, 1)
    with torch.device("meta"):
        meta = CASES[name]()
    stage = split_model_into_stages(meta, generate_stage_module_names(meta, 1), [0])[0]
    materialize_stage(stage, "cpu", ref.state_dict())
    ref_buffers = dict(ref.named_buffers())
    assert set(dict(stage.named_buffers())) == set(ref_buffers)
    for bname, buf in stage.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[bname], rtol=0, atol=0, msg=bname)
    torch.testing.assert_close(
        stage(data["input_ids"], **data["image_kwargs"]), _hf_logits(ref, data), rtol=0, atol=0
    )
    # The same stage with its non-persistent buffers zeroed (what to_empty may leave):
    # wrong logits until init_hf_model_buffers restores them.
    for module in stage.modules():
        for bname in module._non_persistent_buffers_set:
            getattr(module, bname).zero_()
    with torch.no_grad():
        broken = stage(data["input_ids"], **data["image_kwargs"])
        assert (broken - _hf_logits(ref, data)).abs().max() > 1e-3
        init_hf_model_buffers(stage, torch.device("cpu"))
        torch.testing.assert_close(
            stage(data["input_ids"], **data["image_kwargs"]), _hf_logits(ref, data), rtol=0, atol=0
        )


def test_validate_rejects_models_the_forwards_cannot_run():
    model = llama()
    model.model.rotary_emb = None
    with pytest.raises(ValueError, match="has no rotary_emb"):
        validate_hf_model_for_pipeline_support(model)
    with pytest.raises(ValueError, match="no decoder `layers`"):
        validate_hf_model_for_pipeline_support(nn.Linear(2, 2))
    kept = nn.Linear(2, 2)
    kept._pp_keep_self_forward = True  # its own forward is PP-aware: not our business
    validate_hf_model_for_pipeline_support(kept)
