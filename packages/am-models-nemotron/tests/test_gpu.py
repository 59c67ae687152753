"""GPU paths (Transformer Engine attention, CUDA model) against the CPU reference path."""

from __future__ import annotations

import pytest
import torch
from _nemotron_helpers import cpu_backend, rel_err, tiny_config

from am_dtype.backend import HAVE_TE
from am_models_nemotron import NemotronHForCausalLM

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(backend_gpu):
    torch.manual_seed(0)
    cpu = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    cpu.initialize_weights(dtype=torch.float32)
    gpu = NemotronHForCausalLM(tiny_config(), backend=backend_gpu).cuda()
    gpu.load_state_dict(cpu.state_dict())
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
