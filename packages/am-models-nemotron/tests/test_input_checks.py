"""Bad input at the model boundary: a clear error naming it, never a silent result."""

from __future__ import annotations

import logging

import pytest
import torch
from _nemotron_helpers import cpu_backend, tiny_config

from am_models_nemotron import NemotronHForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    m.initialize_weights(dtype=torch.float32)
    return m.eval()


def _ids(batch=2, seq=8):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "cu, match",
    [
        ([1, 4, 8], r"start at 0.*got \[1, 4, 8\]"),
        ([0, 5, 5, 8], r"strictly increase.*got \[0, 5, 5, 8\]"),
        ([0, 6, 3, 8], r"strictly increase"),
        ([0, 4, 7], r"end at the 8 tokens.*got \[0, 4, 7\]"),
        ([0, 4, 9], r"end at the 8 tokens"),
        ([8], r"must be \[N \+ 1\]"),
    ],
)
def test_bad_cu_seqlens(model, cu, match):
    with pytest.raises(ValueError, match=match):
        model(_ids(batch=1), cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_cu_seqlens_dtype_and_batch(model):
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        model(_ids(batch=1), cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="cu_seqlens describes one packed row.*batch of 2"):
        model(_ids(batch=2), cu_seqlens=torch.tensor([0, 8]))


@pytest.mark.parametrize(
    "seq_idx, match",
    [
        ([[1, 1, 1, 1, 2, 2, 2, 2]], r"start at 0.*row 0 is \[1, 1"),
        ([[0, 0, 2, 2, 2, 2, 2, 2]], r"step by 0 or 1"),
        ([[0, 0, 1, 1, 0, 0, 0, 0]], r"contiguous run"),
        ([[0] * 7], r"seq_idx must have shape \[1, 8\]"),
    ],
)
def test_bad_seq_idx(model, seq_idx, match):
    with pytest.raises(ValueError, match=match):
        model(_ids(batch=1), seq_idx=torch.tensor(seq_idx))


def test_mask_shapes_must_match_the_input(model):
    ids = _ids()
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[2, 8\]; got \[2, 9\]"):
        model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[2, 8\]; got \[1, 8\]"):
        model(ids, attention_mask=torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask \(4-D\) must have shape \[2, 1, 8, 8\]"):
        model(ids, attention_mask=torch.ones(2, 1, 8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"padding_mask must have shape"):
        model(ids, padding_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_ids_must_be_2d_integer_tokens_of_the_vocabulary(model):
    with pytest.raises(
        ValueError, match=r"input_ids must be \[batch, seq\]; got shape \[2, 8, 1\]"
    ):
        model(_ids()[..., None])
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]; got shape \[8\]"):
        model(_ids()[0])  # a 1-D prompt without packing information
    with pytest.raises(ValueError, match=r"token id 64, outside the vocabulary \[0, 64\)"):
        model(torch.tensor([[1, 2, 64]]))
    with pytest.raises(ValueError, match=r"token id -1, outside the vocabulary"):
        model(torch.tensor([[1, -1, 3]]))
    with pytest.raises(ValueError, match=r"inputs_embeds must be a floating \[batch, seq, 32\]"):
        model(inputs_embeds=torch.randn(2, 8, 16))


def test_logits_to_keep_must_be_non_negative(model):
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0.*got -1"):
        model(_ids(), logits_to_keep=-1)
    with pytest.raises(TypeError, match="logits_to_keep must be an int"):
        model(_ids(), logits_to_keep="2")


@pytest.mark.parametrize("shape", [(0, 8), (2, 0)])
def test_empty_batch_gives_empty_logits_and_a_zero_loss_with_gradients(model, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    model.zero_grad()
    out = model(ids, labels=ids)
    assert out.logits.shape == (*shape, 64)
    assert out.loss.item() == 0.0
    out.loss.backward()
    for name, param in model.named_parameters():
        # every parameter takes part (as on an EP rank whose peers have tokens), with grad 0
        assert param.grad is not None and not param.grad.any(), name


def test_unknown_keyword_arguments_are_warned_about_once(model, caplog):
    with caplog.at_level(logging.WARNING, logger="am_utils.validation"):
        model(_ids(), attn_mask=torch.ones(2, 8))
        model(_ids(), attn_mask=torch.ones(2, 8))
    warnings = [r.getMessage() for r in caplog.records if "attn_mask" in r.getMessage()]
    assert len(warnings) == 1 and "unknown keyword arguments ['attn_mask']" in warnings[0]


def test_what_transformers_trainer_and_generate_pass_is_accepted_silently(model, caplog):
    ids = _ids()
    with caplog.at_level(logging.WARNING, logger="am_utils.validation"):
        model(
            ids,
            attention_mask=torch.ones_like(ids),
            labels=ids,
            num_items_in_batch=torch.tensor(14),
            return_dict=True,
            output_attentions=False,
            use_cache=False,
        )
        model.generate(ids, max_new_tokens=2, do_sample=False, output_hidden_states=True)
    assert not [r for r in caplog.records if "unknown keyword" in r.getMessage()]
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(ids, output_attentions=True)


def test_generate_rejects_empty_or_1d_prompts_and_wrong_masks(model):
    with pytest.raises(ValueError, match=r"empty prompt \(input_ids shape \[2, 0\]\)"):
        model.generate(torch.empty(2, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids of shape \[batch, seq\].*got shape \[5\]"):
        model.generate(torch.arange(5), max_new_tokens=2)
    ids = _ids(seq=5)
    with pytest.raises(ValueError, match=r"attention_mask of shape \[2, 4\] for a prompt of shape"):
        model.generate(ids, attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask of shape \[5\]"):
        model.generate(input_ids=ids, attention_mask=torch.ones(5, dtype=torch.long))


def test_embeddings_prompt_without_a_cache_is_an_error_not_a_dropped_prompt(model):
    # transformers 5.23 generate() keeps the cache on for this model, so this is the direct call.
    embeds = model.model.embed_tokens(_ids(seq=4)).detach()
    first = model.prepare_inputs_for_generation(
        torch.empty(2, 0, dtype=torch.long), inputs_embeds=embeds, use_cache=False,
        is_first_iteration=True,
    )  # fmt: skip
    assert first["inputs_embeds"] is embeds and first["past_key_values"] is None
    with pytest.raises(ValueError, match="inputs_embeds=...\\) needs use_cache=True"):
        model.prepare_inputs_for_generation(_ids(seq=1), inputs_embeds=embeds, use_cache=False)
