"""GroupedExperts and run_experts against a dense per-token reference, outputs and gradients.

Tolerance: fp32 kernels vs a float64 reference, rtol=1e-5 / atol=1e-6 (the sums are short,
so fp32 rounding stays well inside that).
"""

import pytest
import torch

from am_dtype.backend import BackendConfig
from am_moe.config import EXPERT_ACTIVATIONS, MoEConfig, is_gated
from am_moe.dispatch import LocalDispatcher
from am_moe.experts import GroupedExperts, apply_activation, run_experts

# "torch_mm/grouped" and "torch_mm/padded": the fused single-device path with grouped
# matmuls and with padded batched matmuls; "torch_mm/dispatch": the grouped-mm kernel behind
# the dispatch -> run_experts -> combine contract (the expert-parallel path).
CPU_IMPLS = ("torch", "torch_mm/grouped", "torch_mm/padded", "torch_mm/dispatch")


class _ContractDispatcher(LocalDispatcher):
    """Same behaviour as LocalDispatcher, but not it: GroupedExperts must use the contract path."""


RTOL, ATOL = 1e-5, 1e-6


def _config(activation="swiglu", *, e=6, k=2, d=16, f=8, bias=False) -> MoEConfig:
    return MoEConfig(
        n_routed_experts=e,
        n_shared_experts=0,
        n_activated_experts=k,
        n_expert_groups=1,
        n_limited_groups=1,
        train_gate=True,
        gate_bias_update_factor=0.0,
        aux_loss_coeff=0.0,
        score_func="softmax",
        route_scale=1.0,
        dim=d,
        inter_dim=32,
        moe_inter_dim=f,
        norm_topk_prob=False,
        expert_bias=bias,
        expert_activation=activation,
        dtype=torch.float32,
    )


def _experts(config, impl) -> GroupedExperts:
    torch.manual_seed(0)
    module = GroupedExperts(config, BackendConfig(experts=impl.split("/")[0]))
    if impl.endswith("/dispatch"):
        module.dispatcher = _ContractDispatcher(config.n_routed_experts)
    module.max_padding = 1e9 if impl.endswith("/padded") else 0.0
    module.init_weights(torch.device("cpu"), init_std=0.3)
    if config.expert_bias:
        with torch.no_grad():
            module.gate_up_proj_bias.normal_(0, 0.3)
            module.down_proj_bias.normal_(0, 0.3)
    return module


def _dense_reference(module, x_TD, weights_TK, indices_TK, mask_T):
    """y[t] = sum_k w[t,k] * mlp_{e[t,k]}(x[t]) token by token, in float64."""
    params = {n: p.detach().double().requires_grad_(True) for n, p in module.named_parameters()}
    x = x_TD.detach().double().requires_grad_(True)
    w = weights_TK.detach().double().requires_grad_(True)
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(x.shape[1])
        for k in range(indices_TK.shape[1]):
            e = int(indices_TK[t, k])
            if not mask_T[t]:
                continue
            h = x[t] @ params["gate_and_up_projs"][e]
            if "gate_up_proj_bias" in params:
                h = h + params["gate_up_proj_bias"][e]
            out = apply_activation(h, module.expert_activation) @ params["down_projs"][e]
            if "down_proj_bias" in params:
                out = out + params["down_proj_bias"][e]
            acc = acc + w[t, k] * out
        rows.append(acc)
    return torch.stack(rows), x, w, params


def _routing(t, e, k, *, skip_experts=(), seed=1):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(e) if i not in skip_experts])
    scores = torch.rand(t, allowed.numel(), generator=g)
    indices_TK = allowed[scores.topk(k, dim=-1).indices]
    weights_TK = torch.rand(t, k, generator=g)
    return weights_TK, indices_TK


def _check_against_reference(module, x, weights, indices, mask):
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    y = module(x, mask, weights, indices)
    # A stride-0 upstream grad, as `.sum().backward()` makes, must work (PITFALLS).
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    ref, rx, rw, rparams = _dense_reference(module, x, weights, indices, mask)
    (ref * torch.linspace(-1, 1, ref.shape[-1], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x.grad.double(), rx.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(weights.grad.double(), rw.grad, rtol=RTOL, atol=ATOL)
    for name, p in module.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad.double(), rparams[name].grad, rtol=RTOL, atol=ATOL)
    return x, weights


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("activation", EXPERT_ACTIVATIONS)
def test_matches_dense_reference_every_activation(impl, activation):
    module = _experts(_config(activation), impl)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    weights, indices = _routing(10, 6, 2)
    _check_against_reference(module, x, weights, indices, torch.ones(10, dtype=torch.bool))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_expert_bias_and_unaligned_shapes(impl):
    # d=6, f=5 breaks torch._grouped_mm's 16-byte stride rule: the loop fallback must agree too.
    for d, f in ((16, 8), (6, 5)):
        module = _experts(_config("swiglu", d=d, f=f, bias=True), impl)
        x = torch.randn(9, d, generator=torch.Generator().manual_seed(3))
        weights, indices = _routing(9, 6, 2)
        _check_against_reference(module, x, weights, indices, torch.ones(9, dtype=torch.bool))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_zero_token_experts_get_zero_grads(impl):
    module = _experts(_config("relu2", bias=True), impl)
    x = torch.randn(8, 16)
    weights, indices = _routing(8, 6, 2, skip_experts=(0, 3, 5))
    _check_against_reference(module, x, weights, indices, torch.ones(8, dtype=torch.bool))
    for p in module.parameters():
        assert torch.all(p.grad[[0, 3, 5]] == 0)
        assert p.grad[[1, 2, 4]].abs().sum() > 0


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_masked_tokens_contribute_nothing(impl):
    module = _experts(_config("geglu"), impl)
    x = torch.randn(8, 16)
    weights, indices = _routing(8, 6, 2)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    x, weights = _check_against_reference(module, x, weights, indices, mask)
    y = module(x, mask, weights, indices)
    assert torch.all(y[~mask] == 0)
    assert torch.all(x.grad[~mask] == 0) and torch.all(weights.grad[~mask] == 0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_all_tokens_masked(impl):
    module = _experts(_config("swiglu"), impl)
    x = torch.randn(4, 16, requires_grad=True)
    weights, indices = _routing(4, 6, 2)
    y = module(x, torch.zeros(4, dtype=torch.bool), weights, indices)
    y.sum().backward()
    assert torch.all(y == 0) and torch.all(x.grad == 0)
    assert all(torch.all(p.grad == 0) for p in module.parameters())


def test_fused_path_saves_less_for_backward():
    """The fused single-device path keeps fewer bytes alive for backward than the contract path."""

    def saved_activation_bytes(impl):
        module = _experts(_config("swiglu", e=4, d=64, f=32), impl)
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        x = torch.randn(512, 64, requires_grad=True)
        weights, indices = _routing(512, 4, 2)
        weights.requires_grad_(True)
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x, torch.ones(512, dtype=torch.bool), weights, indices)
        return sum(seen.values())

    contract = saved_activation_bytes("torch_mm/dispatch")
    assert saved_activation_bytes("torch_mm/grouped") < 0.6 * contract
    assert saved_activation_bytes("torch_mm/padded") < 0.7 * contract


def test_bf16_grouped_mm_close_to_fp32():
    config = _config("swiglu")
    module = _experts(config, "torch_mm")
    x = torch.randn(32, 16)
    weights, indices = _routing(32, 6, 2)
    mask = torch.ones(32, dtype=torch.bool)
    y32 = module(x, mask, weights, indices)
    module.to(torch.bfloat16)
    y16 = module(x.bfloat16(), mask, weights.bfloat16(), indices)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)


def test_weight_shapes_follow_activation():
    for activation in EXPERT_ACTIVATIONS:
        module = GroupedExperts(_config(activation, bias=True), BackendConfig(experts="torch"))
        h = 16 if is_gated(activation) else 8
        assert module.gate_and_up_projs.shape == (6, 16, h)
        assert module.down_projs.shape == (6, 8, 16)
        assert module.gate_up_proj_bias.shape == (6, h)
        assert module.down_proj_bias.shape == (6, 16)


def test_gated_layout_is_gate_half_then_up_half():
    h = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    expected = torch.nn.functional.silu(h[:, :2]) * h[:, 2:]
    torch.testing.assert_close(apply_activation(h, "swiglu"), expected)


def test_run_experts_rejects_bad_names_and_counts():
    x, w_up, w_down = torch.randn(4, 8), torch.randn(2, 8, 8), torch.randn(2, 4, 8)
    counts = torch.tensor([1, 3])
    with pytest.raises(ValueError, match="impl='nope'.*accepted"):
        run_experts(x, counts, w_up, w_down, "swiglu", "nope")
    with pytest.raises(ValueError, match="activation='tanh'.*accepted"):
        run_experts(x, counts, w_up, w_down, "tanh", "torch")
    with pytest.raises(ValueError, match="3 groups"):
        run_experts(x, torch.tensor([1, 1, 2]), w_up, w_down, "swiglu", "torch")


def test_layout_choice_follows_balance():
    from am_moe.experts import _GroupedRows, _PaddedRows, _routing_plan

    mask = torch.ones(64, dtype=torch.bool)
    balanced = torch.arange(128).view(64, 2) % 4
    assert isinstance(_routing_plan(balanced, mask, 4, 0.125).rows, _PaddedRows)
    skewed = torch.stack([torch.zeros(64, dtype=torch.long), torch.arange(64) % 3 + 1], dim=1)
    assert isinstance(_routing_plan(skewed, mask, 4, 0.125).rows, _GroupedRows)
    assert isinstance(_routing_plan(balanced, mask, 4, 0.0).rows, _PaddedRows)  # no waste at all
    with pytest.raises(ValueError, match="expert indices must lie in \\[0, 4\\)"):
        _routing_plan(balanced + 1, mask, 4, 0.125)
