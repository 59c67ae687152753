"""The per-stage causal mask cache (`_build_or_reuse_pp_causal_mask`), counted build by build.

Without an attention_mask a stage builds its mask mapping once per (sequence length, batch
size, dtype, device) and reuses it across microbatches and steps; an explicit
attention_mask is rebuilt on every call; packed rows (position_ids restarting inside a row)
are never served the cached plain causal mask. Logits are checked against transformers in
every case, so a wrong reuse cannot hide behind a right count.
"""

from __future__ import annotations

import copy

import torch
from _pp_models import llama, qwen3

from am_pp.hf_utils import _build_or_reuse_pp_causal_mask, patch_hf_model_for_pp
from am_pp.split import generate_stage_module_names, split_model_into_stages


def _patched(model):
    patched = copy.deepcopy(model)
    patch_hf_model_for_pp(patched)
    return patched


def _ids(batch, seq, seed):
    return torch.randint(6, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _builds(model) -> int:
    return getattr(model.model, "_pp_causal_mask_builds", 0)


def test_built_once_across_microbatches_and_steps_and_per_sequence_length():
    model = llama()  # eager attention: the mask is a real 4-D tensor, not sdpa's None
    patched = _patched(model)
    with torch.no_grad():
        for seed in range(3):  # three microbatches of one step
            ids = _ids(2, 12, seed)
            torch.testing.assert_close(patched(ids), model(ids).logits, rtol=0, atol=0)
        assert _builds(patched) == 1
        ids = _ids(2, 7, 10)  # a new sequence length: one more build, right logits
        torch.testing.assert_close(patched(ids), model(ids).logits, rtol=0, atol=0)
        assert _builds(patched) == 2
        ids = _ids(3, 7, 11)  # a new batch size too
        torch.testing.assert_close(patched(ids), model(ids).logits, rtol=0, atol=0)
        assert _builds(patched) == 3
        patched(_ids(2, 12, 12))  # the next step at the first shape: served from the cache
        assert _builds(patched) == 3


def test_explicit_attention_mask_rebuilds_every_call():
    model = llama()
    patched = _patched(model)
    with torch.no_grad():
        for step, pad in enumerate([0, 2, 4]):  # different left padding per microbatch
            ids = _ids(2, 10, step)
            mask = torch.ones_like(ids)
            mask[1, :pad] = 0
            got = patched(ids, attention_mask=mask)
            want = model(ids, attention_mask=mask).logits
            real = mask.bool()
            torch.testing.assert_close(got[real], want[real], rtol=0, atol=0)
            assert _builds(patched) == step + 1
        # Padding really matters for the real tokens: the unmasked call differs there.
        unmasked = patched(ids)
        assert (unmasked[1, pad:] - want[1, pad:]).abs().max() > 1e-4


def test_packed_rows_never_get_the_cached_plain_mask():
    model = llama()
    patched = _patched(model)
    ids = _ids(2, 12, 0)
    packed = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    with torch.no_grad():
        plain = patched(ids)  # fills the cache with the plain causal mask at this shape
        assert _builds(patched) == 1
        for calls in (2, 3):  # packed: built every time, never cached
            got = patched(ids, position_ids=packed)
            assert _builds(patched) == calls
            torch.testing.assert_close(
                got, model(ids, position_ids=packed, use_cache=False).logits, rtol=0, atol=0
            )
        # The second sequence of row 0 sees only itself: not what the plain mask gives.
        assert (got[0, 5:] - plain[0, 5:]).abs().max() > 1e-4
        torch.testing.assert_close(got[1], plain[1], rtol=0, atol=0)  # row 1 is not packed
        # Unpacked position ids (one sequence per row) reuse the cache.
        patched(ids, position_ids=torch.arange(12).expand(2, 12))
        assert _builds(patched) == 3


def test_mixed_sliding_and_full_layers_get_both_masks():
    model = qwen3()  # layer_types: 2 sliding (window 5 < seq 12), 2 full
    patched = _patched(model)
    h = torch.zeros(2, 12, 32)
    pos = torch.arange(12).unsqueeze(0)
    mapping = _build_or_reuse_pp_causal_mask(patched.model, h, None, None, pos)
    assert set(mapping) == {"full_attention", "sliding_attention"}
    assert _build_or_reuse_pp_causal_mask(patched.model, h, None, None, pos) is mapping
    with torch.no_grad():
        ids = _ids(2, 12, 3)
        torch.testing.assert_close(patched(ids), model(ids).logits, rtol=0, atol=0)


def test_every_stage_builds_once_across_microbatches():
    model = llama()
    names = generate_stage_module_names(model, 2)
    first, last = split_model_into_stages(model, names, [0, 1])
    with torch.no_grad():
        for seed in range(4):
            ids = _ids(1, 12, seed)
            torch.testing.assert_close(last(first(ids)), model(ids).logits, rtol=0, atol=0)
    assert _builds(first) == 1 and _builds(last) == 1


def test_packed_position_ids_travel_to_every_stage():
    """Stage 0 returns (hidden states, position ids); later stages take both positionally and
    build the packed mask themselves: the chained logits equal transformers' packed ones."""
    for model in (llama(), qwen3()):
        names = generate_stage_module_names(model, 3, layers_per_stage=[1, 2, 1])
        stages = split_model_into_stages(model, names, [0, 1, 2])
        ids = _ids(2, 12, 5)
        packed = torch.tensor([list(range(5)) + list(range(7)), list(range(4)) * 3])
        with torch.no_grad():
            out = stages[0](ids, position_ids=packed)
            assert isinstance(out, tuple) and out[1] is packed
            out = stages[1](*out)
            logits = stages[2](*out)
            want = model(ids, position_ids=packed, use_cache=False).logits
            torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)
            assert (logits - model(ids).logits).abs().max() > 1e-4  # packing mattered
        assert all(_builds(s) == 1 for s in stages)  # each built its own (packed) mask


def _left_padded(batch: int, seq: int, pads: list[int]) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


def test_attention_mask_travels_to_every_stage_and_rebuilds_each_call():
    """Stage 0 returns (h, position ids, attention mask); every later stage rebuilds its
    padded mask from the carried one on every call (different left padding per microbatch):
    the real tokens' logits equal transformers' padded ones, for 2 and 4 stages."""
    for model in (llama(), qwen3()):
        for num_stages in (2, 4):
            names = generate_stage_module_names(model, num_stages)
            stages = split_model_into_stages(model, names, range(num_stages))
            for call, pads in enumerate([[0, 3], [5, 1], [2, 2]]):
                ids = _ids(2, 12, call)
                mask = _left_padded(2, 12, pads)
                with torch.no_grad():
                    out = stages[0](ids, attention_mask=mask)
                    assert isinstance(out, tuple) and out[2] is mask
                    for stage in stages[1:]:
                        out = stage(*out)
                    want = model(ids, attention_mask=mask).logits
                real = mask.bool()
                torch.testing.assert_close(out[real], want[real], rtol=1e-6, atol=1e-6)
                assert (out[real] - model(ids).logits[real]).abs().max() > 1e-4  # padding mattered
                assert all(_builds(s) == call + 1 for s in stages), [_builds(s) for s in stages]
