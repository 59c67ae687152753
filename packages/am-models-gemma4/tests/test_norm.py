"""FusedGemma4RMSNorm / am_dtype.rms_norm (hand-written backward) vs transformers' Gemma4RMSNorm."""

from __future__ import annotations

import pytest
import torch
from _gemma4_helpers import rel_err
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from am_dtype.norm import rms_norm
from am_models_gemma4 import Gemma4ForConditionalGeneration
from am_models_gemma4.norm import FusedGemma4RMSNorm


@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize(
    ("shape", "dtype", "tol"),
    [
        ((3, 17, 48), torch.float32, 1e-6),  # [B, S, D]: sandwich norms
        ((2, 9, 4, 16), torch.float32, 1e-6),  # [B, S, H, D]: per-head q/k/v norms
        ((5, 32), torch.float64, 1e-6),  # fp64 in, fp32 math (as transformers)
        ((4, 7, 32), torch.bfloat16, 1e-2),
    ],
)
def test_forward_and_gradients_equal_transformers(with_scale, shape, dtype, tol):
    torch.manual_seed(0)
    ref = Gemma4RMSNorm(shape[-1], eps=1e-6, with_scale=with_scale).to(dtype)
    ours = FusedGemma4RMSNorm(shape[-1], eps=1e-6, with_scale=with_scale).to(dtype)
    if with_scale:
        with torch.no_grad():
            ref.weight.copy_(1 + 0.5 * torch.randn(shape[-1]))
        ours.load_state_dict(ref.state_dict())
    x = (3 * torch.randn(shape)).to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    probe = torch.randn(shape).to(dtype)
    y, y_ref = ours(x), ref(x_ref)
    assert y.dtype == y_ref.dtype == dtype
    assert rel_err(y.float(), y_ref.float()) <= tol
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    assert x.grad.dtype == dtype
    assert rel_err(x.grad.float(), x_ref.grad.float()) <= max(tol, 1e-5)
    if with_scale:
        assert ours.weight.grad.dtype == dtype
        assert rel_err(ours.weight.grad.float(), ref.weight.grad.float()) <= max(tol, 1e-5)


def test_gradient_to_the_weight_only_and_to_the_input_only():
    torch.manual_seed(1)
    w = (1 + torch.randn(8)).requires_grad_(True)
    x = torch.randn(6, 8, dtype=torch.float32)
    (rms_norm(x, w, 1e-6) ** 2).sum().backward()  # x needs no grad
    w_ref = w.detach().clone().requires_grad_(True)
    ref = Gemma4RMSNorm(8)
    ref.weight = torch.nn.Parameter(w_ref)
    (ref(x) ** 2).sum().backward()
    assert rel_err(w.grad, ref.weight.grad) <= 1e-6
    x.requires_grad_(True)
    w.requires_grad_(False)
    (rms_norm(x, w, 1e-6) ** 2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_every_text_norm_of_the_moe_model_is_the_fused_one():
    from _gemma4_helpers import cpu_backend, gemma4_config, tiny_moe_text

    model = Gemma4ForConditionalGeneration(gemma4_config(tiny_moe_text()), backend=cpu_backend())
    norms = [m for m in model.model.language_model.modules() if isinstance(m, Gemma4RMSNorm)]
    assert norms and all(isinstance(m, FusedGemma4RMSNorm) for m in norms)
