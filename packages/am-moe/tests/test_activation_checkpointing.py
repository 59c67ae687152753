"""The one activation-checkpoint wrapper (used by parallelize_model and the models) and relu2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from am_moe import parallelizer
from am_moe.activation_checkpointing import (
    checkpoint_blocks,
    is_checkpointed,
    uncheckpoint_blocks,
    unwrap_checkpointed,
)
from am_moe.layers import MLP, relu2


def _blocks(kind):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)]
    if kind == "dict":
        return nn.ModuleDict({str(i): m for i, m in enumerate(layers)})
    return nn.ModuleList(layers)


def _run(container, x):
    for block in container.values() if isinstance(container, nn.ModuleDict) else container:
        x = block(x)
    return x


@pytest.mark.parametrize("kind", ["dict", "list"])
def test_wrap_is_idempotent_keeps_names_and_gradients_and_unwraps(kind):
    container = _blocks(kind)
    originals = list(container.values() if kind == "dict" else container)
    x = torch.randn(4, 8, requires_grad=True)
    _run(container, x).square().sum().backward()
    want = [p.grad.clone() for p in container.parameters()]
    names = [n.replace("._checkpoint_wrapped_module", "") for n, _ in container.named_parameters()]

    assert checkpoint_blocks(container) == 3
    assert checkpoint_blocks(container) == 0  # already wrapped: no double wrapping
    wrapped = list(container.values() if kind == "dict" else container)
    assert all(is_checkpointed(b) for b in wrapped)
    assert [unwrap_checkpointed(b) for b in wrapped] == originals
    got_names = [
        n.replace("._checkpoint_wrapped_module", "") for n, _ in container.named_parameters()
    ]
    assert got_names == names
    container.zero_grad()
    _run(container, x).square().sum().backward()
    for a, b in zip(want, container.parameters(), strict=True):
        torch.testing.assert_close(a, b.grad)

    assert uncheckpoint_blocks(container) == 3
    assert list(container.values() if kind == "dict" else container) == originals
    assert unwrap_checkpointed(originals[0]) is originals[0]


def test_non_container_is_rejected():
    with pytest.raises(TypeError, match="nn.ModuleList or nn.ModuleDict.*Linear"):
        checkpoint_blocks(nn.Linear(2, 2))


def test_parallelizer_uses_the_same_wrapper():
    # parallelize_model's activation_checkpointing=True goes through this module's function.
    assert parallelizer.checkpoint_blocks is checkpoint_blocks


def test_relu2_values_and_gradient_equal_square_of_relu_exactly():
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    ref = x.detach().clone().requires_grad_()
    y, y_ref = relu2(x), torch.square(torch.relu(ref))
    assert torch.equal(y, y_ref)
    g = torch.randn(64, dtype=torch.float64)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, ref.grad)


def test_relu2_mlp_runs_the_two_pass_relu2():
    mlp = MLP(8, 16, dtype=torch.float32, activation="relu2")
    hidden = mlp._act(None, torch.randn(3, 16, requires_grad=True))
    assert "_Relu2" in type(hidden.grad_fn).__name__
