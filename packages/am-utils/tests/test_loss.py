"""causal_lm_loss: the shift, ignore_index, and packed-document boundaries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from am_utils.loss import IGNORE_INDEX, causal_lm_loss, next_token_targets, target_cross_entropy

V = 11


def _data(seed=0, lengths=(4, 6, 3)):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    logits = torch.randn(1, total, V, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (1, total), generator=gen)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return logits, labels, seq_idx, cu, lengths


def test_unpacked_loss_is_shifted_cross_entropy():
    logits, labels, *_ = _data()
    want = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:])
    torch.testing.assert_close(causal_lm_loss(logits, labels), want)
    assert causal_lm_loss(logits, labels).dtype == torch.float32  # computed in fp32


def test_packed_loss_equals_the_documents_trained_apart():
    logits, labels, seq_idx, cu, lengths = _data()
    parts = zip(logits.split(lengths, 1), labels.split(lengths, 1), strict=True)
    # Each document alone contributes (length - 1) targets.
    total = sum(F.cross_entropy(lg[0, :-1].float(), lb[0, 1:], reduction="sum") for lg, lb in parts)
    want = total / (sum(lengths) - len(lengths))
    torch.testing.assert_close(causal_lm_loss(logits, labels, seq_idx), want)
    torch.testing.assert_close(causal_lm_loss(logits, labels, cu_seqlens=cu), want)
    # Without the boundaries the loss differs: a document's last token predicts the next's first.
    assert not torch.allclose(causal_lm_loss(logits, labels), want)


def test_transformers_packing_labels_give_the_same_loss():
    logits, labels, seq_idx, cu, _ = _data(1)
    marked = labels.clone()
    marked[0, cu[1:-1].long()] = IGNORE_INDEX  # each later document's first token
    torch.testing.assert_close(
        causal_lm_loss(logits, marked), causal_lm_loss(logits, labels, seq_idx)
    )


def test_targets_of_batched_rows_with_one_shared_seq_idx():
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    got = next_token_targets(labels, torch.tensor([[0, 0, 1, 1]]))
    assert got.tolist() == [[2, -100, 4, -100], [6, -100, 8, -100]]
    assert next_token_targets(labels, ignore_index=-1)[:, -1].tolist() == [-1, -1]


def test_bad_shapes_are_named():
    logits, labels, *_ = _data()
    with pytest.raises(ValueError, match=r"labels shape \(1, 12\) does not match logits \(1, 13\)"):
        causal_lm_loss(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="seq_idx covers 5 positions but labels have 13"):
        causal_lm_loss(logits, labels, torch.zeros(1, 5, dtype=torch.long))


def test_target_cross_entropy_on_a_shard_of_pre_aligned_targets():
    logits, labels, seq_idx, _, _ = _data(seed=3)
    targets = next_token_targets(labels, seq_idx)
    index = torch.tensor([0, 1, 2, 9, 10, 11, 12])  # a CP rank's chunks
    shard = target_cross_entropy(logits[:, index], targets[:, index], reduction="sum")
    rest = torch.tensor(sorted(set(range(labels.shape[1])) - set(index.tolist())))
    other = target_cross_entropy(logits[:, rest], targets[:, rest], reduction="sum")
    count = int((targets != IGNORE_INDEX).sum())
    expected = causal_lm_loss(logits, labels, seq_idx)
    torch.testing.assert_close((shard + other) / count, expected, rtol=1e-6, atol=0)  # fp32 sums
    with pytest.raises(ValueError, match="reduction='none'"):
        target_cross_entropy(logits, targets, reduction="none")
    with pytest.raises(ValueError, match="does not match"):
        target_cross_entropy(logits, targets[:, :-1])
