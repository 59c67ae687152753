"""The fused CPU path's recycled storage for tensors that outlive a call (`experts.pool`)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch
from _am_moe_test_config import small_moe_config

from am_dtype.backend import BackendConfig
from am_moe.experts import GroupedExperts
from am_moe.experts.pool import _MIN_BYTES, _TensorPool

BIG = (_MIN_BYTES // 4 + 16,)  # float32 elements just above the pooling threshold


def test_storage_is_handed_out_again_only_once_every_tensor_over_it_is_gone():
    pool = _TensorPool()
    like = torch.empty(0)
    a = pool.empty(BIG, like)
    ptr = a.data_ptr()
    view = a[10:]
    del a
    b = pool.empty(BIG, like)  # a view keeps the storage in use
    assert b.data_ptr() != ptr
    del view
    c = pool.empty((BIG[0] // 16, 16), like)  # same bytes, another shape: reused
    assert c.data_ptr() == ptr and c.shape == (BIG[0] // 16, 16) and c.is_contiguous()
    assert pool.empty(BIG, torch.empty(0, dtype=torch.float64)).dtype == torch.float64
    small = pool.empty((4,), like)
    del small
    assert pool.empty((4,), like).untyped_storage().nbytes() == 16
    pool.clear()
    assert pool.empty(BIG, like).data_ptr() not in (ptr, b.data_ptr())


def test_a_tensor_saved_for_a_retained_graph_or_adopted_as_grad_is_not_reused():
    pool = _TensorPool()

    class Save(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            h = pool.empty(x.shape, x)
            h.copy_(x)
            ctx.save_for_backward(h)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            (h,) = ctx.saved_tensors
            grad = pool.empty(h.shape, h)
            return torch.mul(g, h, out=grad)

    w = torch.nn.Parameter(torch.rand(BIG))
    y = Save.apply(w)
    y.backward(torch.ones_like(y), retain_graph=True)
    first = w.grad.clone()
    # Storage the graph still holds (h) or that became w.grad must not come back.
    clobber = pool.empty(BIG, w)
    clobber.fill_(-7.0)
    assert clobber.data_ptr() not in (w.grad.data_ptr(),)
    assert torch.equal(w.grad, first)
    y.backward(torch.ones_like(y))  # reads h again: must be w's values, not -7
    torch.testing.assert_close(w.grad, 2 * first)


def _big_experts(reuse: bool) -> GroupedExperts:
    # w_up's gradient is 5 x 1024 x 2048 fp32 = 40 MB: above glibc's largest mmap threshold
    # (32 MB), so without the pool every backward maps and faults it in afresh.
    config = small_moe_config(
        n_routed_experts=5, n_activated_experts=2, dim=1024, inter_dim=1024, moe_inter_dim=1024,
        norm_topk_prob=False,
        expert_activation="geglu",
    )  # fmt: skip
    torch.manual_seed(0)
    module = GroupedExperts(config, BackendConfig(experts="torch_mm"))
    module.init_weights(init_std=0.02)
    module.cpu_layout = "per_expert"
    module.reuse_cpu_buffers = reuse
    return module


def _step(module, x, weights, indices, set_to_none=True, copy_grads=True):
    x = x.clone().requires_grad_(True)
    y = module(x, torch.ones(x.shape[0], dtype=torch.bool), weights, indices)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    # (the copies are fresh 40 MB tensors: the page-fault test makes none)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()] if copy_grads else None
    if set_to_none:
        module.zero_grad(set_to_none=True)
    return y.detach(), grads


def _inputs(tokens=256, experts=5, k=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 1024, generator=g)
    indices = torch.rand(tokens, experts, generator=g).topk(k, dim=-1).indices
    weights = torch.rand(tokens, k, generator=g)
    return x, weights, indices


class _FreshStorage:
    """Stands in for the pool: every tensor a fresh allocation (the same kernels run)."""

    def empty(self, shape, like):
        return torch.empty(shape, dtype=like.dtype, device=like.device)


def test_pooled_steps_equal_fresh_ones_and_grads_kept_across_steps_accumulate(monkeypatch):
    import am_moe.experts.rows as rows

    x, weights, indices = _inputs()
    pooled, fresh = _big_experts(True), _big_experts(True)
    pool = rows._POOL
    for _ in range(2):  # the second step runs on recycled storage
        y_p, g_p = _step(pooled, x, weights, indices)
        monkeypatch.setattr(rows, "_POOL", _FreshStorage())
        y_f, g_f = _step(fresh, x, weights, indices)
        monkeypatch.setattr(rows, "_POOL", pool)
        assert torch.equal(y_p, y_f)
        for a, b in zip(g_p, g_f, strict=True):
            assert torch.equal(a, b)
    # Grads not cleared: the adopted .grad of step 1 must not be reused as step 2's buffer.
    _step(pooled, x, weights, indices, set_to_none=False)
    _, twice = _step(pooled, x, weights, indices, set_to_none=False)
    for a, b in zip(twice[1:], g_f[1:], strict=True):
        torch.testing.assert_close(a, 2 * b)


@pytest.mark.skipif(sys.platform != "linux", reason="minor page fault counts from getrusage")
def test_a_warm_fwd_bwd_maps_no_fresh_memory():
    """After one step, a step of the same shape takes its large tensors (saved h, weight
    gradients, outputs) from recycled storage: almost no page faults, where fresh tensors
    cost one fault per 4 KiB (the 40 MB w_up gradient alone is ~10k)."""
    x, weights, indices = _inputs()
    module = _big_experts(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the per-expert layout's setting; no OpenMP pool growth
    try:
        # Two warm steps: oneDNN's matmul products (`am_dtype.cpu_gemm`) are plain allocations of a
        # few MB, and glibc moves them from mmap to its heap (adapting its mmap threshold)
        # over the first two steps (measured 1.5-2k faults in step 2, none in step 3).
        for _ in range(2):
            _step(module, x, weights, indices, copy_grads=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _step(module, x, weights, indices, copy_grads=False)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        torch.set_num_threads(threads)
    assert faults < 2000, faults
