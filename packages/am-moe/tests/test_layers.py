"""MoE block: composition, masks, aux-loss backprop, native names, subclassing, init."""

import pytest
import torch
from _am_moe_test_config import small_moe_config
from torch import nn

from am_dtype.backend import BackendConfig
from am_moe.config import MoEConfig
from am_moe.gate import FakeBalancedGate
from am_moe.layers import MLP, MoE

D = 16


def _config(**overrides) -> MoEConfig:
    fields = dict(
        n_routed_experts=4,
        n_shared_experts=1,
        n_activated_experts=2,
        dim=D,
        inter_dim=32,
        moe_inter_dim=8,
        norm_topk_prob=True,
    )
    fields.update(overrides)
    return small_moe_config(**fields)


def _moe(backend=None, **overrides) -> MoE:
    torch.manual_seed(0)
    moe = MoE(_config(**overrides), backend or BackendConfig(experts="torch_mm", linear="torch"))
    moe.init_weights(torch.device("cpu"), init_std=0.3)
    return moe


def _x(shape=(2, 6, D), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_native_parameter_names():
    moe = _moe(
        router_bias=True,
        expert_bias=True,
        shared_expert_gate=True,
        moe_latent_size=8,
        force_e_score_correction_bias=True,
    )
    assert set(moe.state_dict()) == {
        "gate.weight",
        "gate.bias",
        "gate.e_score_correction_bias",
        "experts.gate_and_up_projs",
        "experts.down_projs",
        "experts.gate_up_proj_bias",
        "experts.down_proj_bias",
        "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight",
        "shared_expert_gate.weight",
        "fc1_latent_proj.weight",
        "fc2_latent_proj.weight",
    }
    assert moe.experts.gate_and_up_projs.shape == (4, 8, 16)  # latent width 8, gated 2F
    assert moe.gate.weight.shape == (4, D) and moe.gate.e_score_correction_bias.shape == (4,)


def test_composition_equals_parts():
    moe = _moe(shared_expert_gate=True, moe_latent_size=8)
    x = _x()
    y = moe(x)
    x_TD = x.view(-1, D)
    weights, indices, _ = moe.gate(x_TD)
    mask = torch.ones(12, dtype=torch.bool)
    routed = moe.fc2_latent_proj(moe.experts(moe.fc1_latent_proj(x_TD), mask, weights, indices))
    shared = torch.sigmoid(moe.shared_expert_gate(x_TD)) * moe.shared_experts(x_TD)
    torch.testing.assert_close(y, (routed + shared).view_as(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_and_dtype_preserved(dtype):
    moe = _moe(dtype=dtype)
    for shape in ((2, 6, D), (12, D)):
        x = _x(shape).to(dtype)
        y = moe(x)
        assert y.shape == x.shape and y.dtype == dtype


def test_padding_tokens_get_no_routed_output_or_routed_grad():
    moe = _moe(n_shared_experts=0)
    x = _x().requires_grad_(True)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    y = moe(x, padding_mask=padding)
    assert torch.all(y[padding] == 0) and y[~padding].abs().sum() > 0
    y.sum().backward()
    assert torch.all(x.grad[padding] == 0)
    # Real tokens do not depend on padded ones.
    x2 = x.detach().clone()
    x2[padding] = 50.0
    torch.testing.assert_close(moe(x2, padding_mask=padding)[~padding], y[~padding].detach())


def test_aux_loss_backpropagates_through_output():
    moe = _moe(aux_loss_coeff=0.05)
    moe.train()
    x = _x()
    y = moe(x)
    assert moe.last_aux_loss is not None and moe.last_aux_loss > 0
    y.sum().backward()
    grad_with_aux = moe.gate.weight.grad.clone()

    moe.zero_grad()
    weights, indices, aux = moe.gate(x)
    y_plain = moe.experts(x.view(-1, D), torch.ones(12, dtype=torch.bool), weights, indices)
    y_plain = y_plain + moe.shared_experts(x.view(-1, D))
    (y_plain.sum() + aux).backward()
    torch.testing.assert_close(grad_with_aux, moe.gate.weight.grad)
    torch.testing.assert_close(aux.detach(), moe.last_aux_loss)


class _ModelGate(nn.Module):
    """A model-owned router: routes on its own input, returns [B, S, K] shaped outputs."""

    def __init__(self, n_experts, k):
        super().__init__()
        self.proj = nn.Linear(D, n_experts, bias=False)
        self.k = k
        self.seen = None

    def forward(self, x, token_mask=None, cp_mesh=None):
        self.seen = x
        top = self.proj(x).softmax(-1).topk(self.k, dim=-1)
        return top.values, top.indices, None


def test_subclass_with_model_gate_and_separate_gate_input():
    class MyMoE(MoE):
        def __init__(self, config, backend):
            super().__init__(config, backend)
            self.gate = _ModelGate(config.n_routed_experts, config.n_activated_experts)

    torch.manual_seed(0)
    moe = MyMoE(_config(n_shared_experts=0), BackendConfig(experts="torch"))
    moe.experts.init_weights(init_std=0.3)
    x, router_x = _x(), _x(seed=5)
    y = moe(x, gate_input=router_x)
    assert moe.gate.seen is router_x
    top = moe.gate.proj(router_x.view(-1, D)).softmax(-1).topk(2, dim=-1)
    expected = moe.experts(x.view(-1, D), torch.ones(12, dtype=torch.bool), top.values, top.indices)
    torch.testing.assert_close(y, expected.view_as(x))
    assert isinstance(moe, MoE)


def test_fake_balanced_gate_from_backend():
    moe = _moe(BackendConfig(fake_balanced_gate=True, experts="torch"))
    assert isinstance(moe.gate, FakeBalancedGate)
    assert moe(_x()).shape == (2, 6, D)


def test_init_weights_is_normal_with_zero_biases():
    torch.manual_seed(0)
    moe = MoE(_config(router_bias=True, expert_bias=True, force_e_score_correction_bias=True))
    moe.init_weights(torch.device("cpu"), init_std=0.02)
    for name, p in moe.state_dict().items():
        assert torch.isfinite(p).all(), name
        if "bias" in name:
            assert torch.all(p == 0), name
        else:
            assert 0.01 < p.std() < 0.03, name


def test_mlp_activations():
    relu2 = MLP(D, 8, dtype=torch.float32, activation="relu2")
    assert relu2.gate_proj is None
    x = _x((3, D))
    torch.testing.assert_close(relu2(x), relu2.down_proj(torch.relu(relu2.up_proj(x)) ** 2))
    swiglu = MLP(D, 8, dtype=torch.float32)
    expected = swiglu.down_proj(torch.nn.functional.silu(swiglu.gate_proj(x)) * swiglu.up_proj(x))
    torch.testing.assert_close(swiglu(x), expected)
    with pytest.raises(ValueError, match="activation='gelu'.*accepted"):
        MLP(D, 8, activation="gelu")


@pytest.mark.parametrize("latent", [None, 4])
def test_async_dispatch_runs_the_shared_experts_between_dispatch_start_and_finish(latent):
    from am_moe.dispatch import LocalDispatcher

    events = []

    class Recording(LocalDispatcher):
        def dispatch(self, *args):
            events.append("dispatch")
            return super().dispatch(*args)

        def dispatch_start(self, *args):
            events.append("start")
            return super().dispatch_start(*args)

        def dispatch_finish(self, pending):
            events.append("finish")
            return super().dispatch_finish(pending)

    outs = {}
    for overlap in (False, True):
        backend = BackendConfig(experts="torch", linear="torch", dispatcher_async_dispatch=overlap)
        moe = _moe(backend, moe_latent_size=latent)
        moe.experts.dispatcher = Recording(moe.n_routed_experts)
        moe.shared_experts.register_forward_hook(lambda *_: events.append("shared"))
        events.clear()
        x = _x().requires_grad_(True)
        y = moe(x)
        y.square().sum().backward()
        outs[overlap] = (y.detach(), x.grad, events.copy())
    assert outs[False][2] == ["dispatch", "shared"]
    # Async: the shared experts run between the start of the dispatch and its wait.
    assert outs[True][2] == ["start", "dispatch", "shared", "finish"]
    assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1])
