"""A model that keeps its own forward (`_pp_keep_self_forward`) gets its attention_mask on
every stage: am-pp carries it with the stage outputs (`_own_forward.MaskCarryingStage`).

Two stages on one gloo rank (Interleaved1F1B), shapes inferred from the first microbatch;
the static-shape path (`get_pipeline_stage_metas`) is tested with Nemotron-H in
tests/test_pp_nemotron.py. The toy's layers mix tokens causally (a running sum), so padding
leaks into every later token of a stage that does not see the mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from am_pp import pipeline_model
from am_pp._own_forward import MaskCarryingStage, carried_mask

VOCAB, HIDDEN = 40, 16


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.norm = nn.LayerNorm(HIDDEN)


class OwnForwardLM(nn.Module):
    """PP-aware by itself: parts the splitter set to None are skipped; padding (0 in the
    2-D attention_mask) is zeroed before every causal mix."""

    _pp_keep_self_forward = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = _Backbone()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None):
        m = self.model
        h = m.embed_tokens(input_ids) if m.embed_tokens is not None else input_ids
        keep = None if attention_mask is None else attention_mask.to(h.dtype)[..., None]
        layers = m.layers.values() if isinstance(m.layers, nn.ModuleDict) else m.layers
        for layer in layers:
            x = torch.tanh(layer(h))
            x = x if keep is None else x * keep
            h = h + x.cumsum(1) / h.shape[1]
        h = m.norm(h) if m.norm is not None else h
        return self.lm_head(h) if self.lm_head is not None else h


def _ce(logits, labels):
    return F.cross_entropy(
        logits.flatten(0, 1), F.pad(labels[:, 1:], (0, 1), value=-100).flatten(), ignore_index=-100
    )


def test_attention_mask_reaches_every_stage_of_an_own_forward_model(one_rank_world):
    model = OwnForwardLM()
    pp = pipeline_model(model, schedule="Interleaved1F1B", n_microbatches=2)
    assert pp.num_stages == 2 and not pp.carries_inputs
    assert all(isinstance(s.submod, MaskCarryingStage) for s in pp.pipeline_stages)
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 5, 1]):
        mask[row, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss = pp.step(ids, labels, attention_mask=mask.bool())  # any 0/1 dtype
    ref = _ce(model(ids, attention_mask=mask), labels)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    ref_grads = dict(model.named_parameters())
    for name, p in pp.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        assert abs(float(_ce(model(ids), labels)) - float(ref)) > 1e-3  # the mask mattered
        want = _ce(model(ids), ids)
    # Unpadded: the carried all-ones mask changes nothing.
    torch.testing.assert_close(pp.step(ids, ids), want, rtol=1e-6, atol=0)


def test_own_forward_stages_reject_inputs_that_would_reach_only_the_first(one_rank_world):
    pp = pipeline_model(OwnForwardLM(), schedule="Interleaved1F1B", n_microbatches=2)
    ids = torch.randint(0, VOCAB, (4, 9))
    with pytest.raises(ValueError, match=r"\['seq_idx'\] would reach only the first of 2"):
        pp.step(ids, ids, seq_idx=torch.zeros_like(ids))
    with pytest.raises(ValueError, match=r"attention_mask of shape \(4, 1, 9, 9\)"):
        pp.step(ids, ids, attention_mask=torch.ones(4, 1, 9, 9))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 8\) does not match"):
        carried_mask(torch.ones(2, 8), ids[:2])
