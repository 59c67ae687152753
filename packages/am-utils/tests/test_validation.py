"""am_utils.validation: model-boundary checks shared by the model packages."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from am_utils import validation as v


def test_input_ids_shape_dtype_and_vocabulary():
    v.check_input_ids(torch.tensor([[0, 5, 9]]), 10)
    v.check_input_ids(torch.tensor([0, 5]), 10, allow_1d=True)
    v.check_input_ids(torch.empty(0, 4, dtype=torch.long), 10)  # nothing to range-check
    with pytest.raises(ValueError, match=r"\[batch, seq\]; got shape \[3\]"):
        v.check_input_ids(torch.tensor([0, 1, 2]), 10)
    with pytest.raises(ValueError, match=r"or a packed \[T\].*got shape \[1, 2, 3\]"):
        v.check_input_ids(torch.zeros(1, 2, 3, dtype=torch.long), 10, allow_1d=True)
    with pytest.raises(TypeError, match="integer token ids, got dtype torch.float32"):
        v.check_input_ids(torch.zeros(1, 3), 10)
    with pytest.raises(ValueError, match=r"token id 10, outside the vocabulary \[0, 10\)"):
        v.check_input_ids(torch.tensor([[1, 10]]), 10)
    with pytest.raises(ValueError, match=r"token id -3.*\(min -3, max 4\)"):
        v.check_input_ids(torch.tensor([[-3, 4]]), 10)


def test_value_checks_follow_the_device_policy(monkeypatch):
    bad = torch.tensor([[1, 99]])
    assert v.values_checkable(bad)  # CPU: always
    with v.validate_values(False):
        v.check_input_ids(bad, 10)  # switched off: not read
        assert not v.values_checkable(bad)
    meta = torch.empty(2, 2, device="meta")
    assert not v.values_checkable(meta)
    cuda_like = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.delenv("AM_VALIDATE_INPUTS", raising=False)
    assert not v.values_checkable(cuda_like)  # would be a device sync per forward
    monkeypatch.setenv("AM_VALIDATE_INPUTS", "1")
    assert v.values_checkable(cuda_like)
    with v.validate_values(False):
        assert not v.values_checkable(cuda_like)


def test_cu_seqlens_and_seq_idx():
    assert v.check_cu_seqlens(torch.tensor([0, 3, 7]), 7) == [0, 3, 7]
    v.check_cu_seqlens(torch.tensor([[0, 7]]), 7)
    for bad in ([1, 7], [0, 3, 3, 7], [0, 4, 6], [0, 8]):
        with pytest.raises(ValueError, match="start at 0, strictly increase and end at the 7"):
            v.check_cu_seqlens(torch.tensor(bad), 7)
    with pytest.raises(ValueError, match=r"\[N \+ 1\].*got shape \[2, 2\]"):
        v.check_cu_seqlens(torch.tensor([[0, 1], [0, 1]]), 1)
    with v.validate_values(False):
        assert v.check_cu_seqlens(torch.tensor([0, 9]), 7) is None
        assert v.check_cu_seqlens(torch.tensor([0, 7]), 7, force=True) == [0, 7]

    v.check_seq_idx(torch.tensor([[0, 0, 1], [0, 1, 2]]), 2, 3)
    v.check_seq_idx(torch.tensor([0, 0, 1]), 2, 3)  # shared by every row
    with pytest.raises(ValueError, match=r"row 1 is \[0, 2, 2\]"):
        v.check_seq_idx(torch.tensor([[0, 0, 1], [0, 2, 2]]), 2, 3)
    with pytest.raises(ValueError, match=r"shape \[2, 3\].*got \[3, 3\]"):
        v.check_seq_idx(torch.zeros(3, 3, dtype=torch.long), 2, 3)
    with pytest.raises(TypeError, match="integer tensor"):
        v.check_seq_idx(torch.zeros(2, 3), 2, 3)


def test_masks_logits_to_keep_and_attributes():
    v.check_mask_shape(None, "attention_mask", [(2, 3)])
    v.check_mask_shape(torch.ones(2, 3), "attention_mask", [(2, 3), (2, 5)])
    with pytest.raises(ValueError, match=r"shape \[2, 3\] or \[2, 5\]; got \[2, 4\]"):
        v.check_mask_shape(torch.ones(2, 4), "attention_mask", [(2, 3), (2, 5)])
    v.check_logits_to_keep(0)
    v.check_logits_to_keep(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="got -2"):
        v.check_logits_to_keep(-2)
    with pytest.raises(TypeError):
        v.check_logits_to_keep(True)
    v.require_attributes(SimpleNamespace(a=1, b=None), ["a", "b"], "x")
    with pytest.raises(
        AttributeError, match=r"SimpleNamespace config lacks .* by thing: \['b', 'c'\]"
    ):
        v.require_attributes(SimpleNamespace(a=1), ["a", "b", "c", "b"], "thing")


def test_unknown_kwargs_warn_once_per_name(caplog):
    with caplog.at_level(logging.WARNING, logger="am_utils.validation"):
        assert v.warn_unknown_kwargs({"attn_mask": 1, "labels": 2}, ["labels"], "M.fwd") == [
            "attn_mask"
        ]
        v.warn_unknown_kwargs({"attn_mask": 1}, ["labels"], "M.fwd")
        v.warn_unknown_kwargs({"attn_mask": 1, "lables": 1}, ["labels"], "M.fwd")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "M.fwd ignores unknown keyword arguments ['attn_mask']" in messages[0]
    assert "['lables']" in messages[1]


def test_generate_inputs():
    ids = torch.ones(2, 4, dtype=torch.long)
    v.check_generate_inputs(ids, torch.ones(2, 4))
    v.check_generate_inputs(None)  # generate() builds a BOS prompt itself
    v.check_generate_inputs(torch.empty(2, 0, dtype=torch.long), None, torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="empty prompt"):
        v.check_generate_inputs(torch.empty(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got shape \[4\]"):
        v.check_generate_inputs(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask of shape \[2, 3\] for a prompt"):
        v.check_generate_inputs(ids, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"seq > 0; got shape \[2, 0, 8\]"):
        v.check_generate_inputs(None, None, torch.zeros(2, 0, 8))
