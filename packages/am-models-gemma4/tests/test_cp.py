"""Context-parallel helpers that need no process group (the ring itself: test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from am_models_gemma4.cp import cp_attention, load_balanced_indices


def test_load_balanced_shards_cover_every_position_once_with_even_causal_work():
    shards = [load_balanced_indices(16, 4, r) for r in range(4)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(16))
    assert shards[0].tolist() == [0, 1, 14, 15]
    # causal work of a query is its position + 1: every rank gets the same total
    assert len({int((s + 1).sum()) for s in shards}) == 1


def test_bad_lengths_and_missing_setup_are_named():
    with pytest.raises(ValueError, match="multiple of 4"):
        load_balanced_indices(10, 2, 0)
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="setup_cp_attention"):
        cp_attention(torch.nn.Module(), q, q, q, None)


def test_ring_mask_equals_the_packed_mask_on_the_whole_sequence():
    """The mask the ring applies block by block, on the whole sequence, is the packed VLM
    mask of one process (documents, windows, image blocks) for every real token."""
    from am_models_gemma4 import _build_packed_gemma4_causal_mask_mapping
    from am_models_gemma4.cp import _allowed, _cp_meta, _document_ids, _positions_in_documents

    lengths = [[5, 8, 3], [7, 9]]
    seq_ids = torch.stack(
        [torch.repeat_interleave(torch.arange(1, len(r) + 1), torch.tensor(r)) for r in lengths]
    )
    positions = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in lengths])
    ids = torch.zeros_like(seq_ids)
    assert torch.equal(_document_ids(ids, positions, None), seq_ids)  # from position resets
    assert torch.equal(_document_ids(ids, None, seq_ids), seq_ids)
    assert torch.equal(_positions_in_documents(seq_ids), positions)
    mm = torch.zeros_like(seq_ids, dtype=torch.bool)
    mm[0, 6:12] = True  # a 6-token image in document 2 of row 0
    mm[1, 1:3] = True
    meta = _cp_meta(seq_ids, mm)
    expected = _build_packed_gemma4_causal_mask_mapping(seq_ids, mm.long(), torch.float32, 6)
    assert torch.equal(_allowed(meta, meta, None, False), expected["full_attention"])
    assert torch.equal(_allowed(meta, meta, 6, True), expected["sliding_attention"])
    assert _allowed(meta, meta, 6, True)[0, 0, 6, 11]  # the image both ways ...
    assert not _allowed(meta, meta, 6, False)[0, 0, 6, 11]  # ... only with vision attention
