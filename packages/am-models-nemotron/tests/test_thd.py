"""Packed (THD) sequences: no state or attention leaks across sequence boundaries."""

from __future__ import annotations

import pytest
import torch
from _nemotron_helpers import cpu_backend, rel_err, tiny_config

from am_models_nemotron import NemotronHForCausalLM

LENGTHS = (7, 12, 5)  # 12 > chunk_size: a boundary falls inside a Mamba chunk


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    m.initialize_weights(dtype=torch.float32)
    return m.eval()


def _sequences():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (1, n), generator=gen) for n in LENGTHS]


def _cu_seqlens():
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("how", ["cu_seqlens", "seq_idx"])
def test_packed_batch_equals_each_sequence_alone(model, how):
    seqs = _sequences()
    packed = torch.cat(seqs, dim=1)
    if how == "cu_seqlens":
        kwargs = {"cu_seqlens": _cu_seqlens()}
    else:
        kwargs = {"seq_idx": torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None]}
    with torch.no_grad():
        logits = model(packed, **kwargs).logits
        alone = [model(s).logits for s in seqs]
    assert logits.shape == (1, sum(LENGTHS), 64)
    for part, ref in zip(logits.split(LENGTHS, dim=1), alone, strict=True):
        assert rel_err(part, ref) <= 1e-4
    with torch.no_grad():
        leaky = model(packed).logits  # without boundaries later sequences see earlier ones
    assert rel_err(leaky.split(LENGTHS, dim=1)[1], alone[1]) > 1e-3


def test_packed_gradients_equal_sum_of_separate_gradients(model):
    seqs = _sequences()
    model.zero_grad()
    logits = model(torch.cat(seqs, dim=1), cu_seqlens=_cu_seqlens()).logits
    logits.square().mean().mul(sum(LENGTHS)).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for s in seqs:
        model(s).logits.square().mean().mul(s.shape[1]).backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert rel_err(packed[name], param.grad) <= 1e-4, name


def test_thd_2d_hidden_input_to_base_model(model):
    seqs = _sequences()
    packed = torch.cat(seqs, dim=1)
    embeds = model.model.embed_tokens(packed)[0]  # [T, H]
    with torch.no_grad():
        h_thd = model.model(inputs_embeds=embeds, cu_seqlens=_cu_seqlens())
        h_bshd = model.model(packed, cu_seqlens=_cu_seqlens())
    assert h_thd.shape == (sum(LENGTHS), 32)
    assert torch.allclose(h_thd, h_bshd[0])


def test_packed_loss_gives_no_target_across_a_boundary(model):
    """Plain labels on a packed batch: the last token of a sequence predicts nothing."""
    seqs = _sequences()
    packed = torch.cat(seqs, dim=1)
    marked = packed.clone()
    marked[0, _cu_seqlens()[:-1].long()] = -100  # transformers' packing convention
    with torch.no_grad():
        out = model(packed, labels=packed, cu_seqlens=_cu_seqlens())
        ref = model(packed, labels=marked, cu_seqlens=_cu_seqlens())
        alone = [model(s, labels=s) for s in seqs]
    assert torch.equal(out.loss, ref.loss)
    weights = torch.tensor([n - 1 for n in LENGTHS], dtype=torch.float32)
    expected = (torch.stack([o.loss for o in alone]) * weights).sum() / weights.sum()
    assert rel_err(out.loss, expected) <= 1e-5
