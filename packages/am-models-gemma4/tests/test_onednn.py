"""onednn_linear / OneDNNLinear (oneDNN fp32 GEMM, hand-written backward) vs F.linear in fp64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _gemma4_helpers import cpu_backend, gemma4_config, rel_err, tiny_moe_text
from torch import nn

from am_models_gemma4 import Gemma4ForConditionalGeneration
from am_models_gemma4.onednn import OneDNNLinear, onednn_available, onednn_linear

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _ran_onednn(y: torch.Tensor) -> bool:
    return "OneDNNLinear" in type(y.grad_fn).__name__


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("x_shape", "transposed"),
    [((64, 48), False), ((3, 17, 48), False), ((48, 64), True)],  # 2D, [B, S, K], strided x
)
def test_forward_and_gradients_equal_fp64_linear(bias, x_shape, transposed):
    torch.manual_seed(0)
    x64 = torch.randn(x_shape, dtype=torch.float64)
    x64 = x64.t() if transposed else x64
    w64 = torch.randn(40, 48, dtype=torch.float64)
    b64 = torch.randn(40, dtype=torch.float64) if bias else None
    probe = torch.randn(*x64.shape[:-1], 40, dtype=torch.float64)
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    ref = F.linear(x64, w64, b64)
    grads_ref = torch.autograd.grad((ref * probe).sum(), leaves64)
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    y = onednn_linear(leaves[0], leaves[1], leaves[2] if bias else None)
    assert _ran_onednn(y) and y.dtype == torch.float32 and y.shape == ref.shape
    grads = torch.autograd.grad((y * probe.float()).sum(), leaves)
    # fp32 GEMMs (K = 48): F.linear's fp32 error vs fp64 is ~1e-7 here.
    assert rel_err(y.double(), ref) <= 2e-6
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.shape == want.shape
        assert rel_err(got.double(), want) <= 2e-6


@needs_onednn
def test_gradient_to_the_input_only_and_to_the_weight_only():
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 16), torch.randn(8, 16)
    probe = torch.randn(2, 9, 8)
    (gx,) = torch.autograd.grad((onednn_linear(x.requires_grad_(), w) * probe).sum(), [x])
    assert rel_err(gx, probe @ w) <= 1e-6
    x.requires_grad_(False)
    (gw,) = torch.autograd.grad((onednn_linear(x, w.requires_grad_()) * probe).sum(), [w])
    assert rel_err(gw, probe.reshape(-1, 8).t() @ x.reshape(-1, 16)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_and_cpu_autocast_take_f_linear(dtype):
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    y = onednn_linear(x, w)
    assert not _ran_onednn(y)
    assert torch.equal(y, F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = onednn_linear(x.detach().float().requires_grad_(), w.detach().float())
    assert not _ran_onednn(y) and y.dtype == torch.bfloat16


@needs_onednn
def test_every_text_linear_of_the_moe_model_runs_on_onednn():
    model = Gemma4ForConditionalGeneration(gemma4_config(tiny_moe_text()), backend=cpu_backend())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, OneDNNLinear) for m in linears)
    # The tie still holds, and the state dict is nn.Linear's.
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert set(model.lm_head.state_dict()) == {"weight"}
    ids = torch.randint(0, 100, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    nodes, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert "_OneDNNLinearBackward" in nodes
    assert not {"MmBackward0", "AddmmBackward0"} & nodes  # no linear left on MKL's path
