"""GroupedExperts and run_experts against a dense per-token reference, outputs and gradients.

Tolerance: fp32 kernels vs a float64 reference, rtol=1e-5 / atol=1e-6 (the sums are short,
so fp32 rounding stays well inside that).
"""

import pytest
import torch
from _am_moe_test_config import small_moe_config

from am_dtype.backend import BackendConfig
from am_dtype.cpu_gemm import onednn_available
from am_moe.config import EXPERT_ACTIVATIONS, MoEConfig, is_gated
from am_moe.dispatch import LocalDispatcher
from am_moe.experts import GroupedExperts, apply_activation, run_experts

# "torch_mm/<layout>": the fused single-device path with each CPU row layout;
# "torch_mm/per_expert/<matmul>": the expert-by-expert layout with each fp32 matmul kernel
# (`am_dtype.cpu_gemm`; "onednn" only where this torch has it);
# "torch_mm/dispatch": the grouped-mm kernel behind the dispatch -> run_experts -> combine
# contract (the expert-parallel path).
CPU_IMPLS = (
    "torch",
    "torch_mm/split",
    "torch_mm/padded",
    "torch_mm/grouped",
    "torch_mm/per_expert/torch",
    pytest.param(
        "torch_mm/per_expert/onednn",
        marks=pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN"),
    ),
    "torch_mm/dispatch",
)


class _ContractDispatcher(LocalDispatcher):
    """Same behaviour as LocalDispatcher, but not it: GroupedExperts must use the contract path."""


RTOL, ATOL = 1e-5, 1e-6


def _config(activation="swiglu", *, e=6, k=2, d=16, f=8, bias=False) -> MoEConfig:
    return small_moe_config(
        n_routed_experts=e,
        n_activated_experts=k,
        dim=d,
        inter_dim=32,
        moe_inter_dim=f,
        norm_topk_prob=False,
        expert_bias=bias,
        expert_activation=activation,
    )


def _experts(config, impl) -> GroupedExperts:
    torch.manual_seed(0)
    module = GroupedExperts(config, BackendConfig(experts=impl.split("/")[0]))
    if impl.endswith("/dispatch"):
        module.dispatcher = _ContractDispatcher(config.n_routed_experts)
    parts = impl.split("/")
    if len(parts) > 1 and parts[1] in ("split", "padded", "grouped", "per_expert"):
        module.cpu_layout = parts[1]
        module.max_padding = 1e9  # "padded" even when loads are uneven
    if len(parts) > 2:
        module.cpu_gemm = parts[2]
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
    module = _experts(_config("swiglu", bias=True), impl)
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
    assert saved_activation_bytes("torch_mm/split") < 0.6 * contract
    assert saved_activation_bytes("torch_mm/padded") < 0.7 * contract


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bf16_close_to_fp32(impl):
    config = _config("geglu")
    module = _experts(config, impl)
    x = torch.randn(32, 16)
    weights, indices = _routing(32, 6, 2)
    mask = torch.ones(32, dtype=torch.bool)
    y32 = module(x, mask, weights, indices)
    y32.sum().backward()
    g32 = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    module.to(torch.bfloat16)
    y16 = module(x.bfloat16(), mask, weights.bfloat16(), indices)
    y16.float().sum().backward()
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)
    for g16, g in zip((p.grad for p in module.parameters()), g32, strict=True):
        # bf16 rounds each product: compare whole gradients, not single elements.
        assert ((g16.float() - g).norm() / g.norm()).item() < 2e-2


def test_reduced_precision_cpu_forward_reads_column_major_weights():
    """On CPU, bf16/fp16 `x @ w` with both operands row-major runs ~10x slower than with w
    column-major: the forward matmuls take the weights column-major in those dtypes (same
    values), and fp32/fp64 weights as they are (no copy)."""
    from am_moe.experts.rows import _matmul_operand

    w = torch.randn(3, 8, 4)
    w64 = w.double()
    assert _matmul_operand(w) is w and _matmul_operand(w64) is w64
    for dtype in (torch.bfloat16, torch.float16):
        w16 = w.to(dtype)
        col = _matmul_operand(w16)
        assert col.stride() == (32, 1, 8) and torch.equal(col, w16)


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


def test_split_layout_puts_the_common_load_in_one_batched_block():
    from am_moe.experts.rows import _GroupedRows, _PaddedRows, _routing_plan, _SplitRows

    mask = torch.ones(64, dtype=torch.bool)
    indices = torch.stack([torch.arange(64) % 4, (torch.arange(64) + 1) % 4], dim=1)
    indices[:5, 1] = 0  # expert 0 gets 5 extra rows, the others 32 or fewer
    plan = _routing_plan(indices, mask, 4, "split")
    counts = torch.bincount(indices.flatten(), minlength=4)
    assert isinstance(plan.rows, _SplitRows) and plan.rows.head == int(counts.min())
    assert plan.src_R.numel() == 128  # no padding rows
    # Every (token, k) pair lands on a distinct row holding that token.
    assert plan.slot_N.unique().numel() == 128
    assert torch.equal(plan.src_R[plan.slot_N], plan.pair_N // 2)
    assert isinstance(_routing_plan(indices, mask, 4, "grouped").rows, _GroupedRows)
    # "padded" pads to the largest load (36 of loads 36, 30, 31, 31: 144 rows for 128, 12.5%
    # padding) only within max_padding; otherwise it splits.
    assert isinstance(_routing_plan(indices, mask, 4, "padded", 0.1).rows, _SplitRows)
    padded = _routing_plan(indices, mask, 4, "padded", 0.125)
    assert isinstance(padded.rows, _PaddedRows) and padded.src_R.numel() == 144
    with pytest.raises(ValueError, match="cpu_layout='diagonal'"):
        _routing_plan(indices, mask, 4, "diagonal")
    with pytest.raises(ValueError, match="expert indices must lie in \\[0, 4\\)"):
        _routing_plan(indices + 1, mask, 4, "split")


@pytest.mark.parametrize("layout", ["split", "padded"])
def test_split_and_padded_layouts_with_head_and_tail_rows(layout):
    module = _experts(_config("swiglu", e=4, bias=True), f"torch_mm/{layout}")
    indices = torch.stack([torch.arange(24) % 4, (torch.arange(24) + 1) % 4], dim=1)
    indices[:5, 1] = 0  # loads 16, 10, 11, 11: a batched head of 10 rows per expert + a tail
    weights = torch.rand(24, 2, generator=torch.Generator().manual_seed(4))
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    _check_against_reference(module, x, weights, indices, torch.ones(24, dtype=torch.bool))


@pytest.mark.parametrize("activation", ["relu2", "swiglu", "geglu"])
@pytest.mark.parametrize("layout", ["padded", "split", "grouped", "per_expert"])
def test_reused_cpu_buffers_never_leak_between_calls(activation, layout):
    """Two forwards before either backward (two layers, or accumulation) with the shared
    workspace: outputs are not overwritten by the second call and every gradient equals the
    run with fresh buffers."""
    config = _config(activation, e=4, k=2, bias=True)
    torch.manual_seed(3)
    xs = [torch.randn(t, config.dim) for t in (11, 7)]
    routes = [_routing(x.shape[0], config.n_routed_experts, 2, seed=i) for i, x in enumerate(xs)]
    results = []
    for reuse in (True, False):
        module = _experts(config, f"torch_mm/{layout}")
        module.reuse_cpu_buffers = reuse
        leaves, outs = [], []
        for x, (w, i) in zip(xs, routes, strict=True):
            x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            outs.append(module(x, torch.ones(x.shape[0], dtype=torch.bool), w, i))
            leaves += [x, w]
        snapshot = [o.detach().clone() for o in outs]
        # Second call's scratch use must not have touched the first call's output.
        sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs).backward()
        for o, s in zip(outs, snapshot, strict=True):
            assert torch.equal(o.detach(), s)
        grads = [leaf.grad for leaf in leaves] + [p.grad for p in module.parameters()]
        results.append((snapshot, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip(out_a + grads_a, out_b + grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("dtype", "workspace"),
    [(torch.float32, False), (torch.bfloat16, False), (torch.float64, False),
     (torch.bfloat16, True)],
)  # fmt: skip
def test_geglu_closed_form_is_bit_identical_to_the_plain_math(dtype, workspace):
    """Gemma 4's experts: gelu_pytorch_tanh(gate) * up. The closed form (and the workspace
    kernels in half precision, which keep ATen's GeLU) give exactly what autograd gives for
    the plain expression."""
    from am_moe.experts.activations import _geglu_with_grad, _geglu_with_grad_into
    from am_moe.experts.rows import _Scratch

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(37, 2 * 24, generator=g) * 3).to(dtype)
    grad_a = torch.randn(37, 24, generator=g).to(dtype)
    leaf = h.clone().requires_grad_(True)
    gate, up = leaf[:, :24], leaf[:, 24:]
    plain = torch.nn.functional.gelu(gate, approximate="tanh") * up
    (plain_grad,) = torch.autograd.grad(plain, leaf, grad_a)
    if workspace:
        a, grad_fn = _geglu_with_grad_into(h, _Scratch("geglu"))
    else:
        a, grad_fn = _geglu_with_grad(h)
    assert torch.equal(a, plain.detach())
    assert torch.equal(apply_activation(h, "geglu"), plain.detach())
    assert torch.equal(grad_fn(grad_a.clone()), plain_grad)


def _geglu_plain(h, f):
    return torch.nn.functional.gelu(h[:, :f], approximate="tanh") * h[:, f:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_geglu_sigmoid_form_workspace_kernels_equal_the_tanh_gelu(dtype):
    """fp32/fp64 workspace kernels compute gelu_tanh(g) as g * sigmoid(2u) and its
    derivative from that sigmoid (`activations._geglu_sigmoid_grad_into`): against autograd
    of the plain tanh expression, in float64 to 1e-12 and in float32 to a few ulp, over
    gates from -40 to 40 (both tails, zero, tiny values); the forward kernel gives exactly
    the activation the backward recomputes."""
    from am_moe.experts.activations import _geglu_into, _geglu_with_grad_into
    from am_moe.experts.rows import _Scratch

    g = torch.Generator().manual_seed(0)
    f = 40
    gate = torch.cat([torch.linspace(-40, 40, 801), torch.tensor([0.0, 1e-30, -1e-30, 1e-4])])
    gate = torch.cat([gate, torch.randn(195, generator=g) * 3]).view(-1, f)
    h = torch.cat([gate, torch.randn(gate.shape, generator=g)], dim=1).to(dtype)
    grad_a = torch.randn(gate.shape, generator=g).to(dtype)
    leaf = h.double().clone().requires_grad_(True)
    plain = _geglu_plain(leaf, f)
    (plain_grad,) = torch.autograd.grad(plain, leaf, grad_a.double())
    a, grad_fn = _geglu_with_grad_into(h, _Scratch("geglu"))
    a = a.clone()
    grad_h = grad_fn(grad_a.clone())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=4e-6, atol=1e-6)
    torch.testing.assert_close(a.double(), plain.detach(), **tol)
    torch.testing.assert_close(grad_h.double(), plain_grad, **tol)
    assert torch.equal(_geglu_into(h, _Scratch("geglu")), a)


def test_auto_layout_is_per_expert_at_one_fp32_thread_else_padded():
    """cpu_layout="auto" (the default) runs grouped rows expert by expert at one thread in
    fp32/fp64, padded otherwise; the outputs equal the explicit layouts'."""
    from am_moe.experts.blocks import _PerExpertRows
    from am_moe.experts.rows import _routing_plan, resolve_layout

    assert GroupedExperts.cpu_layout == "auto"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert resolve_layout("auto", torch.float32) == "per_expert"
        assert resolve_layout("auto", torch.float64) == "per_expert"
        assert resolve_layout("auto", torch.bfloat16) == "padded"
        torch.set_num_threads(2)
        assert resolve_layout("auto", torch.float32) == "padded"
        assert resolve_layout("split", torch.float32) == "split"
        torch.set_num_threads(1)
        indices = torch.stack([torch.arange(24) % 4, (torch.arange(24) + 1) % 4], dim=1)
        mask = torch.ones(24, dtype=torch.bool)
        assert isinstance(_routing_plan(indices, mask, 4, "auto").rows, _PerExpertRows)
        module = _experts(_config("swiglu", e=4, bias=True), "torch_mm")
        x = torch.randn(24, module.gate_and_up_projs.shape[1])
        weights = torch.rand(24, 2)
        auto = module(x, mask, weights, indices)
        module.cpu_layout = "padded"
        padded = module(x, mask, weights, indices)
        torch.testing.assert_close(auto, padded, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("activation", ["geglu", "relu2", "swiglu"])
@pytest.mark.parametrize("reuse", [True, False])
def test_per_expert_layout_equals_grouped_in_float64(activation, reuse):
    """The expert-by-expert loop ("per_expert") against the grouped-mm path ("grouped") in
    float64: output and every gradient (input, routing weights, weights, biases), with uneven
    loads and an expert that gets no rows (its gradients must be exact zeros)."""
    config = _config(activation, e=5, k=2, d=16, f=8, bias=True)
    x = torch.randn(23, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    weights, indices = _routing(23, 5, 2, skip_experts=(3,), seed=8)
    weights = weights.double()
    indices[:6, 0] = 0  # expert 0 takes extra rows: loads differ
    results = {}
    for layout in ("grouped", "per_expert"):
        module = _experts(config, f"torch_mm/{layout}").double()
        module.reuse_cpu_buffers = reuse
        xl, wl = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        y = module(xl, torch.ones(23, dtype=torch.bool), wl, indices)
        (y * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        grads = {name: p.grad for name, p in module.named_parameters()}
        results[layout] = (y.detach(), xl.grad, wl.grad, grads)
    (y_a, gx_a, gw_a, gp_a), (y_b, gx_b, gw_b, gp_b) = results["grouped"], results["per_expert"]
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_b, y_a, **tol)
    torch.testing.assert_close(gx_b, gx_a, **tol)
    torch.testing.assert_close(gw_b, gw_a, **tol)
    for name, grad in gp_a.items():
        torch.testing.assert_close(gp_b[name], grad, **tol, msg=name)
        assert torch.all(gp_b[name][3] == 0), name
        assert gp_b[name][[0, 1, 2, 4]].abs().sum() > 0, name


def test_backend_cpu_gemm_reaches_the_experts_and_unknown_names_are_refused():
    """BackendConfig.cpu_gemm picks the per-expert loop's kernel (the "auto" rule itself is
    tested in am-dtype's test_cpu_gemm); a bad name set on the module is refused on use."""
    module = GroupedExperts(
        _config("relu2", e=4), BackendConfig(experts="torch_mm", cpu_gemm="torch")
    )
    assert module.cpu_gemm == "torch"
    module = _experts(_config("relu2", e=4), "torch_mm/per_expert")
    module.cpu_gemm = "blas"
    weights, indices = _routing(6, 4, 2)
    with pytest.raises(ValueError, match="cpu_gemm='blas'"):
        module(torch.randn(6, 16), torch.ones(6, dtype=torch.bool), weights, indices)


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("activation", ["geglu", "relu2"])
def test_per_expert_onednn_matmuls_at_blocked_shapes(activation):
    """The oneDNN matmuls at sizes where it runs its blocked (brgemm) kernels, not the
    tiny-shape path of the other tests: fp32 output and every gradient against float64, to
    1e-5 relative plus 2e-6 of the largest entry (sums of 64-128 terms), the same bound
    the torch.mm run meets."""
    config = _config(activation, e=4, k=2, d=128, f=64, bias=True)
    x = torch.randn(96, 128, generator=torch.Generator().manual_seed(11))
    weights, indices = _routing(96, 4, 2, seed=12)
    mask = torch.ones(96, dtype=torch.bool)
    upstream = torch.linspace(-1, 1, 128)
    for kind in ("torch", "onednn"):
        module = _experts(config, f"torch_mm/per_expert/{kind}")
        xl, wl = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        y = module(xl, mask, wl, indices)
        (y * upstream).sum().backward()
        ref, rx, rw, rparams = _dense_reference(module, xl, wl, indices, mask)
        (ref * upstream.double()).sum().backward()
        pairs = [(y, ref), (xl.grad, rx.grad), (wl.grad, rw.grad)]
        pairs += [(p.grad, rparams[n].grad) for n, p in module.named_parameters()]
        for got, want in pairs:
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6 * scale)
