"""Parity with transformers' NemotronHForCausalLM: checkpoints, logits, loss, every gradient."""

from __future__ import annotations

import pytest
import torch
from _nemotron_helpers import cpu_backend, randomize_hf, rel_err, tiny_config
from transformers import NemotronHForCausalLM as HFNemotronH

from am_dtype.cpu_gemm import CpuGemmLinear, onednn_available
from am_models_nemotron import NemotronHForCausalLM

TOL = 1e-4


@pytest.fixture(scope="module", params=[None, 16], ids=["dense_experts", "latent_experts"])
def saved(request, tmp_path_factory):
    """A transformers model (fp32, random weights) and the directory its save_pretrained wrote."""
    torch.manual_seed(0)
    hf = randomize_hf(HFNemotronH(tiny_config(latent=request.param))).eval()
    path = tmp_path_factory.mktemp("hf_nemotron")
    hf.save_pretrained(path)
    return hf, path


def _batch(seed=1, batch=2, seq=19):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


@pytest.mark.parametrize("cpu_gemm", ["torch", "onednn"])
def test_logits_loss_and_every_gradient_match(saved, cpu_gemm):
    if cpu_gemm == "onednn" and not onednn_available():
        pytest.skip("torch built without oneDNN")
    hf, path = saved
    ours = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend(cpu_gemm=cpu_gemm))
    # BackendConfig.cpu_gemm reaches every projection (lm_head, Mamba, attention, MLP, experts').
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 5 and all(isinstance(m, CpuGemmLinear) for m in linears)
    assert {m.cpu_gemm for m in linears} == {cpu_gemm}
    ids, labels = _batch()
    ref = hf(ids, labels=labels)
    out = ours(ids, labels=labels)
    assert out.logits.shape == ref.logits.shape == (2, 19, 64)
    assert rel_err(out.logits.float(), ref.logits.float()) <= TOL
    assert torch.allclose(out.loss, ref.loss, rtol=TOL, atol=0)

    hf.zero_grad()
    ref.loss.backward()
    out.loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    mapped = ours.state_dict_adapter.from_hf(hf_grads)
    ours_params = dict(ours.named_parameters())
    assert set(mapped) == set(ours_params), set(mapped) ^ set(ours_params)
    for name, param in ours_params.items():
        assert param.grad is not None, name
        assert rel_err(param.grad, mapped[name]) <= TOL, name


def test_reads_transformers_in_memory_layout(saved):
    hf, path = saved
    from_disk = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend())
    native = from_disk.state_dict_adapter.from_hf(hf.state_dict())
    reference = from_disk.state_dict()
    assert set(native) == set(reference)
    for key, value in native.items():
        assert torch.equal(value, reference[key]), key


def test_our_checkpoint_loads_back_into_transformers(saved, tmp_path):
    hf, path = saved
    ours = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend())
    ours.save_pretrained(tmp_path)
    reloaded = HFNemotronH.from_pretrained(tmp_path).eval()
    ids, _ = _batch(seed=2)
    with torch.no_grad():
        expected = hf(ids).logits
        assert torch.equal(reloaded(ids).logits, expected)
        assert rel_err(ours(ids).logits, expected) <= TOL


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attn", ["eager", "flex"])
def test_attention_backends_match_sdpa(saved, attn):
    _, path = saved
    ids, labels = _batch(seq=11)
    sdpa = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend())
    other = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend(attn=attn))
    with torch.no_grad():  # inference: the backend's own kernel (flex included) on CPU
        assert rel_err(other(ids).logits, sdpa(ids).logits) <= TOL
    a, b = sdpa(ids, labels=labels), other(ids, labels=labels)
    assert rel_err(b.logits, a.logits) <= TOL
    a.loss.backward()
    b.loss.backward()
    ga = sdpa.model.layers["2"].mixer.q_proj.weight.grad
    gb = other.model.layers["2"].mixer.q_proj.weight.grad
    assert rel_err(gb, ga) <= TOL


def test_left_padded_batch_matches_unpadded_rows(saved):
    _, path = saved
    ours = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend())
    ids, _ = _batch(seed=3, batch=2, seq=12)
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=ids.dtype), ids[1:, : 12 - pad]], dim=1)
    batch = torch.cat([ids[:1], padded])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        both = ours(batch, attention_mask=mask).logits
        alone = ours(ids[1:, : 12 - pad]).logits
        full = ours(ids[:1]).logits
    assert rel_err(both[1, pad:], alone[0]) <= TOL
    assert rel_err(both[0], full[0]) <= TOL


def test_from_pretrained_in_bf16_keeps_the_correction_bias_fp32(saved):
    hf, path = saved
    ours = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend(), dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    bias = ours.model.layers["1"].mixer.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, hf.model.layers[1].mixer.gate.e_score_correction_bias)
    ids, _ = _batch(seed=4)
    with torch.no_grad():
        assert rel_err(ours(ids).logits.float(), hf(ids).logits) < 0.05
