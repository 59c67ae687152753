"""squeeze_input_for_thd."""

from __future__ import annotations

import pytest
import torch

from am_utils import squeeze_input_for_thd


def test_squeeze_and_filter_sentinel():
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    padding_mask = torch.tensor([[False, False, False, False, True]])
    attn_kwargs = {
        "cu_seqlens": torch.tensor([[0, 3, 5, -1000, -1000]]),
        "cu_seqlens_padded": torch.tensor([[0, 3, 6, -1000, -1000]]),
        "max_seqlen": torch.tensor([3]),
        "seq_lens": torch.tensor([[3, 2]]),
        "window": 128,
    }
    ids, pos, mask, kwargs = squeeze_input_for_thd(
        input_ids, position_ids, padding_mask, attn_kwargs
    )
    assert torch.equal(ids, torch.tensor([1, 2, 3, 4, 5]))
    assert torch.equal(pos, torch.tensor([0, 1, 2, 0, 1]))
    assert torch.equal(mask, torch.tensor([False, False, False, False, True]))
    assert torch.equal(kwargs["cu_seqlens"], torch.tensor([0, 3, 5]))
    assert torch.equal(kwargs["cu_seqlens_padded"], torch.tensor([0, 3, 6]))
    assert kwargs["max_seqlen"] == 3 and isinstance(kwargs["max_seqlen"], int)
    assert torch.equal(kwargs["seq_lens"], torch.tensor([3, 2]))
    assert kwargs["window"] == 128
    assert kwargs is attn_kwargs  # updated in place


def test_custom_sentinel_and_int_max_seqlen():
    attn_kwargs = {"cu_seqlens": torch.tensor([[0, 4, 7, -1]]), "max_seqlen": 4}
    _, _, _, kwargs = squeeze_input_for_thd(
        torch.zeros(1, 7, dtype=torch.long), torch.arange(7)[None], None, attn_kwargs, -1
    )
    assert torch.equal(kwargs["cu_seqlens"], torch.tensor([0, 4, 7]))
    assert kwargs["max_seqlen"] == 4
    assert kwargs["cu_seqlens"].is_contiguous()


def test_input_ids_none_and_embeddings():
    ids, pos, mask, _ = squeeze_input_for_thd(None, torch.arange(6)[None], torch.ones(1, 6), {})
    assert ids is None and pos.shape == (6,) and mask.shape == (6,)
    embeds = torch.randn(1, 6, 4)
    ids, _, _, _ = squeeze_input_for_thd(embeds, torch.arange(6)[None], None, {})
    assert ids.shape == (6, 4)


def test_already_squeezed_inputs_pass_through():
    ids = torch.arange(5)
    out, pos, _, kwargs = squeeze_input_for_thd(
        ids, ids, None, {"cu_seqlens": torch.tensor([0, 5])}
    )
    assert out is ids and pos is ids
    assert torch.equal(kwargs["cu_seqlens"], torch.tensor([0, 5]))


def test_rejects_real_batch_dim():
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 5\)"):
        squeeze_input_for_thd(torch.zeros(2, 5), torch.zeros(1, 5), None, {})
    with pytest.raises(ValueError, match="cu_seqlens has shape"):
        squeeze_input_for_thd(None, torch.zeros(1, 5), None, {"cu_seqlens": torch.zeros(2, 3)})


def test_rejects_multi_value_max_seqlen():
    with pytest.raises(ValueError, match="max_seqlen must hold a single value"):
        squeeze_input_for_thd(None, torch.zeros(1, 5), None, {"max_seqlen": torch.tensor([[3, 4]])})
