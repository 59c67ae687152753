"""BackendConfig.cpu_gemm in the Gemma 4 MoE model: every text linear is an am_dtype
CpuGemmLinear on the configured kernel (the kernel's own math is tested in am-dtype), and
"torch" leaves no oneDNN node in the graph."""

from __future__ import annotations

import pytest
import torch
from _gemma4_helpers import cpu_backend, gemma4_config, tiny_moe_text
from torch import nn

from am_dtype.cpu_gemm import CpuGemmLinear, onednn_available
from am_models_gemma4 import Gemma4ForConditionalGeneration

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _graph_nodes(loss: torch.Tensor) -> set[str]:
    nodes, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return nodes


@needs_onednn
def test_every_text_linear_of_the_moe_model_runs_on_onednn():
    # The default ("auto") reaches every text linear; which kernel it stands for depends on
    # the CPU (oneDNN on AMD AVX-512, MKL on Intel), so the graph is checked under "onednn".
    default = Gemma4ForConditionalGeneration(gemma4_config(tiny_moe_text()), backend=cpu_backend())
    text = [m for n, m in default.named_modules() if isinstance(m, nn.Linear) and "language" in n]
    assert text and all(isinstance(m, CpuGemmLinear) and m.cpu_gemm == "auto" for m in text)
    backend = cpu_backend(cpu_gemm="onednn")
    model = Gemma4ForConditionalGeneration(gemma4_config(tiny_moe_text()), backend=backend)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    text = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "language" in n]
    assert text and all(isinstance(m, CpuGemmLinear) and m.cpu_gemm == "onednn" for m in text)
    assert isinstance(model.lm_head, CpuGemmLinear) and linears
    # The tie still holds, and the state dict is nn.Linear's.
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert set(model.lm_head.state_dict()) == {"weight"}
    ids = torch.randint(0, 100, (2, 12))
    nodes = _graph_nodes(model(input_ids=ids, labels=ids).loss)
    assert "_OneDNNLinearBackward" in nodes
    assert not {"MmBackward0", "AddmmBackward0"} & nodes  # no linear left on MKL's path


def test_cpu_gemm_torch_keeps_every_linear_and_the_attention_on_torch():
    backend = cpu_backend(cpu_gemm="torch")
    model = Gemma4ForConditionalGeneration(gemma4_config(tiny_moe_text()), backend=backend)
    cpu_linears = [m for m in model.modules() if isinstance(m, CpuGemmLinear)]
    assert cpu_linears and {m.cpu_gemm for m in cpu_linears} == {"torch"}
    ids = torch.randint(0, 100, (2, 12))
    nodes = _graph_nodes(model(input_ids=ids, labels=ids).loss)
    assert not any("OneDNN" in n or "GemmAttention" in n for n in nodes), sorted(nodes)
