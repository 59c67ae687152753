"""generate() through transformers' GenerationMixin with the hybrid cache."""

from __future__ import annotations

import pytest
import torch
from _nemotron_helpers import cpu_backend, randomize_hf, rel_err, tiny_config
from transformers import NemotronHForCausalLM as HFNemotronH

from am_models_nemotron import NemotronHForCausalLM, NemotronHybridCache

GEN_PATTERN = ["linear_attention", "full_attention", "moe", "linear_attention", "mlp"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize_hf(HFNemotronH(tiny_config(GEN_PATTERN, latent=16))).eval()
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    return hf, NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend())


def test_greedy_generate_matches_transformers_token_for_token(pair):
    hf, ours = pair
    prompt = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = hf.generate(prompt, **kwargs)
    got = ours.generate(prompt, **kwargs)
    assert got.shape == (2, 7 + 32)
    assert torch.equal(got, expected)


def test_left_padded_generate_matches_transformers_and_unpadded_row(pair):
    hf, ours = pair
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, hf.generate(ids, attention_mask=mask, **kwargs))
    assert torch.equal(got[1, 3:], ours.generate(ids[1:, 3:], **kwargs)[0])


def test_decode_processes_one_token_per_step_with_constant_size_state(pair):
    _, ours = pair
    seen_lengths = []
    hook = ours.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen_lengths.append(args[0].shape[1]), with_kwargs=True
    )
    captured = {}
    original = ours.prepare_inputs_for_generation

    def spy(*args, **kwargs):
        inputs = original(*args, **kwargs)
        captured.setdefault("cache", inputs["past_key_values"])
        return inputs

    ours.prepare_inputs_for_generation = spy
    try:
        prompt = torch.randint(3, 64, (1, 5))
        out = ours.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    finally:
        hook.remove()
        del ours.prepare_inputs_for_generation
    assert seen_lengths == [5] + [1] * 39  # prefill once, then exactly one new position per step
    cache = captured["cache"]
    assert isinstance(cache, NemotronHybridCache)
    assert cache.get_seq_length() == out.shape[1] - 1
    assert cache.get_seq_length(1) == out.shape[1] - 1  # attention layer 1 holds every position
    length = cache.get_seq_length(1)
    assert length <= cache.kv_capacity(1) < 2 * length  # doubling buffer: amortized O(1) append
    state = cache.mamba_state(0)
    assert state.conv_state.shape == (1, ours.model.layers["0"].mixer.conv_dim, 4)
    assert state.ssm_state.shape == (1, 4, 8, 8)  # independent of the 44 positions seen


def test_cached_decoding_equals_full_recompute(pair):
    _, ours = pair
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(ids).logits
        prefill = ours(ids[:, :6], use_cache=True)  # builds its own cache
        cache = prefill.past_key_values
        assert isinstance(cache, NemotronHybridCache) and cache.get_seq_length() == 6
        steps = [prefill.logits]
        for t in range(6, 12):
            steps.append(ours(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-4


def test_prepare_inputs_for_generation_prefill_then_decode(pair):
    _, ours = pair
    ids = torch.randint(3, 64, (2, 6))
    first = ours.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids))
    assert isinstance(first["past_key_values"], NemotronHybridCache)
    assert first["input_ids"].shape == (2, 6)
    with torch.no_grad():
        ours(**first)
    longer = torch.cat([ids, ids[:, :1]], dim=1)
    second = ours.prepare_inputs_for_generation(longer, past_key_values=first["past_key_values"])
    assert second["input_ids"].shape == (2, 1)
    assert torch.equal(second["input_ids"], longer[:, -1:])


def test_make_causal_mask_prefill_and_decode():
    prefill = NemotronHForCausalLM._make_causal_mask(4, 4, 2, torch.float32, torch.device("cpu"))
    assert prefill.shape == (2, 1, 4, 4)
    blocked = prefill[0, 0] < 0
    assert torch.equal(blocked, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))
    decode = NemotronHForCausalLM._make_causal_mask(1, 9, 3, torch.float32, torch.device("cpu"))
    assert decode.shape == (3, 1, 1, 9) and not decode.any()


def test_generate_from_inputs_embeds_continues_like_from_ids(pair):
    _, ours = pair
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(8))
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    from_ids = ours.generate(ids, **kwargs)
    with torch.no_grad():
        embeds = ours.model.embed_tokens(ids)
    from_embeds = ours.generate(inputs_embeds=embeds, **kwargs)
    assert torch.equal(from_embeds, from_ids[:, 6:])
