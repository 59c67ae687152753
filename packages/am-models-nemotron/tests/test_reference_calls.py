"""Calls as users of transformers make them: hidden states, positional masks, embeddings prompts."""

from __future__ import annotations

import pytest
import torch
from _nemotron_helpers import cpu_backend, randomize_hf, rel_err, tiny_config
from transformers import NemotronHForCausalLM as HFNemotronH

from am_models_nemotron import NemotronHForCausalLM

TOL = 1e-5
PATTERN = ["linear_attention", "full_attention", "moe", "linear_attention", "mlp"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize_hf(HFNemotronH(tiny_config(PATTERN))).eval()
    path = tmp_path_factory.mktemp("calls")
    hf.save_pretrained(path)
    return hf, NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend())


def _ids(seed=1, batch=2, seq=11):
    return torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- hidden states


def test_hidden_states_equal_transformers_element_by_element(pair):
    hf, ours = pair
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states
        got = ours(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(ref) == len(PATTERN) + 1  # embeddings + every block
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a.shape == b.shape and rel_err(a, b) <= TOL, i
    # The last one is the final-normed output, as transformers returns it.
    assert torch.equal(got[-1], ours.model(ids))


def test_hidden_states_argument_overrides_the_config_both_ways(pair):
    _, ours = pair
    ids = _ids(seq=5)
    with torch.no_grad():
        assert ours(ids).hidden_states is None
        ours.output_hidden_states = True  # as config.output_hidden_states=True sets it
        try:
            assert len(ours(ids).hidden_states) == len(PATTERN) + 1
            assert ours(ids, output_hidden_states=False).hidden_states is None
        finally:
            ours.output_hidden_states = False
        assert len(ours(ids, output_hidden_states=True).hidden_states) == len(PATTERN) + 1


def test_hidden_states_selected_by_index_as_transformers_does(pair):
    hf, ours = pair
    ids = _ids(seq=6)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=[0, -1]).hidden_states
        got = ours(ids, output_hidden_states=[0, -1]).hidden_states
    assert [t is None for t in got] == [t is None for t in ref]
    assert rel_err(got[0], ref[0]) <= TOL and rel_err(got[-1], ref[-1]) <= TOL
    with pytest.raises(ValueError, match=r"indices \[9\] are out of range for 6"):
        ours(ids, output_hidden_states=[9])


def test_generate_returns_hidden_states_when_asked(pair):
    hf, ours = pair
    prompt = _ids(seed=2, seq=4)
    kwargs = dict(
        max_new_tokens=3, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
    )
    got, ref = ours.generate(prompt, **kwargs), hf.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for step_got, step_ref in zip(got.hidden_states, ref.hidden_states, strict=True):
        assert rel_err(step_got[-1], step_ref[-1]) <= 1e-4


# --------------------------------------------------------------------------- positional calls


def test_positional_mask_is_the_attention_mask_when_mtp_is_off(pair):
    hf, ours = pair
    ids = _ids(seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        positional = ours(ids, mask).logits
        keyword = ours(ids, attention_mask=mask).logits
        unmasked = ours(ids).logits
        reference = hf(ids, mask).logits
    assert torch.equal(positional, keyword)
    assert rel_err(positional[1, 4:], unmasked[1, 4:]) > 1e-3  # the mask was not dropped
    assert rel_err(positional[1, 4:], reference[1, 4:]) <= 1e-4
    with pytest.raises(TypeError, match="attention_mask both positionally and by keyword"):
        ours(ids, mask, attention_mask=mask)
    with pytest.raises(TypeError, match="at most one more positional argument"):
        ours(ids, mask, None)
    embeds = torch.zeros(2, 11, 32)
    with pytest.raises(TypeError, match="MTP embeddings, but this model has no MTP heads"):
        ours(ids, embeds)


def _mtp_model(depths=2):
    torch.manual_seed(0)
    cfg = tiny_config(num_nextn_predict_layers=depths, mtp_layers_block_type=["full_attention"])
    m = NemotronHForCausalLM(cfg, backend=cpu_backend())
    m.initialize_weights(dtype=torch.float32)
    return m.eval()


def test_positional_mask_with_mtp_on_is_an_error_naming_the_problem():
    m = _mtp_model()
    ids = _ids(seq=8)
    with pytest.raises(TypeError, match=r"with MTP on .*positional argument 2 is a torch.int64"):
        m(ids, torch.ones_like(ids))
    embeds = m._build_mtp_embed_inputs_for_pp(ids)
    with torch.no_grad():
        given = m(ids, *embeds, attention_mask=torch.ones_like(ids))
        built = m(ids)
    for a, b in zip(given.mtp_per_depth_h, built.mtp_per_depth_h, strict=True):
        assert torch.equal(a, b)


def test_mtp_embed_inputs_are_the_shifted_ids_with_token_zero_in_the_tail():
    depths = 3
    m = _mtp_model(depths)
    ids = _ids(seq=7)
    embeds = m._build_mtp_embed_inputs_for_pp(ids)
    assert len(embeds) == depths
    for d, got in enumerate(embeds, start=1):
        shifted = torch.cat([ids[:, d:], torch.zeros(2, d, dtype=ids.dtype)], dim=1)
        assert torch.equal(got, m.model.embed_tokens(shifted)), d


# --------------------------------------------------------------------------- embeddings prompts


def test_prepare_inputs_for_an_embeddings_prefill(pair):
    _, ours = pair
    embeds = torch.randn(2, 6, 32)
    empty = torch.empty(2, 0, dtype=torch.long)
    position_ids = torch.arange(6).expand(2, 6)
    got = ours.prepare_inputs_for_generation(
        empty, inputs_embeds=embeds, position_ids=position_ids, is_first_iteration=True
    )
    assert got["input_ids"] is None and got["inputs_embeds"] is embeds
    assert torch.equal(got["cache_position"], torch.arange(6))
    assert torch.equal(got["position_ids"], position_ids)
    with torch.no_grad():
        out = ours(**got)
    assert out.logits.shape == (2, 1, 64) and got["past_key_values"].get_seq_length() == 6
    step = ours.prepare_inputs_for_generation(
        torch.tensor([[5], [7]]),
        inputs_embeds=embeds,
        past_key_values=got["past_key_values"],
        next_sequence_length=1,
        position_ids=torch.arange(7).expand(2, 7),
    )
    assert torch.equal(step["input_ids"], torch.tensor([[5], [7]]))
    assert "inputs_embeds" not in step
    assert torch.equal(step["cache_position"], torch.tensor([6]))
    assert torch.equal(step["position_ids"], torch.tensor([[6], [6]]))


def test_generate_from_inputs_embeds_continues_as_transformers_does_from_the_ids(pair):
    # transformers 5.23's NemotronH rejects generate(inputs_embeds=...) (its
    # prepare_inputs_for_generation does not forward them), so the reference is its
    # generation from the token ids those embeddings come from.
    hf, ours = pair
    ids = _ids(seed=8, seq=6)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    got = ours.generate(inputs_embeds=embeds, **kwargs)
    assert got.shape == (2, 8)
    assert torch.equal(got, hf.generate(ids, **kwargs)[:, 6:])


# --------------------------------------------------------------------------- Trainer's loss kwargs


def test_num_items_in_batch_normalizes_the_loss_as_transformers_does(pair):
    # transformers' Trainer passes num_items_in_batch (forward takes **kwargs) and then does
    # not divide the loss by the accumulation steps: ignoring it would scale gradients.
    hf, ours = pair
    ids = _ids(seed=9, batch=4, seq=10)
    labels = ids.clone()
    labels[0, :6] = -100
    labels[3] = -100  # a row without targets
    n_items = int((labels[:, 1:] != -100).sum())
    halves = [slice(0, 2), slice(2, 4)]
    with torch.no_grad():
        ref = [hf(ids[s], labels=labels[s], num_items_in_batch=n_items).loss for s in halves]
        got = [ours(ids[s], labels=labels[s], num_items_in_batch=n_items).loss for s in halves]
        whole = ours(ids, labels=labels).loss  # the token mean over both microbatches
        empty = ours(ids[3:], labels=labels[3:], num_items_in_batch=n_items).loss
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=0)
    assert torch.allclose(got[0] + got[1], whole, rtol=1e-5)
    assert empty.item() == 0.0  # no targets: 0 (as transformers), not NaN
