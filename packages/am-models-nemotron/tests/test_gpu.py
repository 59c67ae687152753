"""GPU paths (Transformer Engine attention, CUDA model) against the CPU reference path."""

from __future__ import annotations

import pytest
import torch
from _nemotron_helpers import cpu_backend, rel_err, tiny_config

from am_dtype.backend import HAVE_TE
from am_models_nemotron import NemotronHForCausalLM

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _load(model, state_dict):
    # TE modules add an `_extra_state` entry (FP8 metadata) that the sdpa model lacks.
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing


def _pair(backend_gpu):
    torch.manual_seed(0)
    cpu = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    cpu.initialize_weights(dtype=torch.float32)
    gpu = NemotronHForCausalLM(tiny_config(), backend=backend_gpu).cuda()
    _load(gpu, cpu.state_dict())
    return cpu.eval(), gpu.eval()


@needs_cuda
def test_cuda_model_matches_cpu():
    cpu, gpu = _pair(cpu_backend())
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        assert rel_err(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits) <= 1e-3


@needs_cuda
@pytest.mark.skipif(not HAVE_TE, reason="needs transformer_engine (the 'te' extra)")
def test_te_attention_matches_sdpa_prefill_and_decode():
    cpu, gpu = _pair(cpu_backend(attn="te"))
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        assert rel_err(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits) <= 1e-3
        a = gpu.generate(ids[:, :6].cuda(), max_new_tokens=8, do_sample=False).cpu()
        b = cpu.generate(ids[:, :6], max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


@needs_cuda
@pytest.mark.skipif(not HAVE_TE, reason="needs transformer_engine (the 'te' extra)")
def test_te_attention_matches_sdpa_on_packed_thd_batch():
    """A [1, T] batch of 3 sequences with cu_seqlens: TE's THD path against sdpa, both on CUDA.

    bf16, since TE's fused / flash kernels (the ones that take THD) need 16-bit inputs.
    """
    lengths = (7, 12, 5)
    torch.manual_seed(0)
    config = tiny_config(dtype="bfloat16")
    sdpa = NemotronHForCausalLM(config, backend=cpu_backend())
    sdpa.initialize_weights(dtype=torch.bfloat16)
    sdpa = sdpa.cuda().eval()
    te = NemotronHForCausalLM(config, backend=cpu_backend(attn="te")).cuda().eval()
    _load(te, sdpa.state_dict())
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 64, (1, n), generator=gen).cuda() for n in lengths]
    packed = torch.cat(seqs, dim=1)
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        got = te(packed, cu_seqlens=cu, qkv_format="thd").logits.float()
        ref = sdpa(packed, cu_seqlens=cu).logits.float()
        alone = [te(s).logits.float() for s in seqs]
    assert rel_err(got, ref) <= 2e-2
    for part, one in zip(got.split(lengths, dim=1), alone, strict=True):
        assert rel_err(part, one) <= 2e-2
    grads = []
    for model in (sdpa, te):
        model.zero_grad()
        model(packed, cu_seqlens=cu).logits.float().square().mean().backward()
        grads.append(
            torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        )
    assert rel_err(grads[1], grads[0]) <= 3e-2


def _fp8_enabled() -> bool:
    """TE's own record of whether an FP8 autocast is active (its module moved in TE 2.x)."""
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    return FP8GlobalStateManager.is_fp8_enabled()


@needs_cuda
@pytest.mark.skipif(not HAVE_TE, reason="needs transformer_engine (the 'te' extra)")
def test_forward_under_real_te_fp8_autocast():
    """backend.te_fp8: every te.Linear runs with TE's FP8 enabled; logits near the bf16 model.

    Attention/MLP/MoE blocks only, with widths and token counts that are multiples of 16 (TE's
    FP8 GEMMs need them; the Mamba in_proj of the tiny config is not).
    """
    from am_dtype import TEFp8Config

    config = tiny_config(
        ["full_attention", "moe", "mlp"],
        hidden_size=64,
        head_dim=16,
        intermediate_size=64,
        moe_shared_expert_intermediate_size=32,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    base = dict(attn="sdpa", linear="te", rms_norm="torch_fp32", experts="torch_mm")
    bf16 = NemotronHForCausalLM(config, backend=cpu_backend(**base)).cuda()
    bf16.initialize_weights(dtype=torch.bfloat16)
    fp8 = NemotronHForCausalLM(
        config, backend=cpu_backend(**base, te_fp8=TEFp8Config("current"))
    ).cuda()
    fp8.load_state_dict(bf16.state_dict())
    seen = []
    linears = [
        m
        for m in fp8.modules()
        if type(m).__name__ == "Linear" and "transformer_engine" in type(m).__module__
    ]
    assert linears
    for m in linears:
        m.register_forward_pre_hook(lambda *_: seen.append(_fp8_enabled()))
    ids = torch.randint(0, 64, (2, 32), device="cuda")
    out = fp8(ids, labels=ids)
    assert len(seen) >= len(linears) and all(seen)
    assert not _fp8_enabled()  # the context was left
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in fp8.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = bf16(ids).logits
    assert rel_err(out.logits.detach().float(), ref.float()) <= 0.1
