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
