"""The per-step costs of the trainer: host syncs, the optimizer kernel, clipping."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


class ScalarReads(TorchDispatchMode):
    """Counts `aten._local_scalar_dense` (what `.item()`, `float(t)` and `int(t)` call: a host
    sync on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def engine(tiny):
    """(engine, optimizer, monitor, batch, plan) of the tiny recipe on one in-process rank."""
    from am_automodel.mesh import ProcessGroup, build_mesh
    from am_automodel.metrics import ExpertLoadMonitor
    from am_automodel.optim import build_optimizer
    from am_automodel.train import LocalEngine, prepare

    prep = prepare(tiny())
    with ProcessGroup(prep.plan):
        eng = LocalEngine(prep, build_mesh(prep.plan), 0, torch.device("cpu"))
        from am_automodel.data import RowLoader, build_datasets

        rows, _ = build_datasets(prep.recipe.data, prep.tokenizer, 0)
        batch = RowLoader(rows, 2, 0, 1, seed=0).next_batch()
        optimizer = build_optimizer(eng.module, prep.recipe.optimizer)
        # lr 0: the weights (hence the routing, hence the model's own scalar reads) stay fixed.
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        yield eng, optimizer, ExpertLoadMonitor(eng.module), batch, prep.plan


def test_a_step_reads_no_scalar_beyond_the_models_own(engine) -> None:
    """The framework's part of a step (target counts, loss sums, clipping, the MoE load
    monitor) reads no scalar per microbatch or per step: its losses and norm come back in one
    `.tolist()`. The model's own forward/backward reads are counted separately and subtracted."""
    from am_automodel.train import _train_step

    eng, optimizer, monitor, batch, plan = engine
    with ScalarReads() as bare:
        loss_sum, _ = eng.runner.loss_sum(batch)
        loss_sum.backward()
    eng.module.zero_grad(set_to_none=True)
    monitor.pop()
    for k in (1, 3):
        with ScalarReads() as step:
            loss, grad_norm = _train_step(eng.runner, [batch] * k, plan, optimizer, 1e-3)
            stats = monitor.pop()
        assert step.count == k * bare.count, (k, step.count, bare.count)
        assert isinstance(loss, float) and isinstance(grad_norm, float) and grad_norm > 1e-3
        assert set(stats) == {"moe_load_imbalance"} and stats["moe_load_imbalance"] >= 1.0


def test_the_step_loss_is_the_token_mean_over_its_microbatches(engine) -> None:
    from am_automodel.train import _train_step

    eng, optimizer, _, batch, plan = engine
    with torch.no_grad():
        loss_sum, n = eng.runner.loss_sum(batch)
    loss, _ = _train_step(eng.runner, [batch, batch], plan, optimizer, 0.0)
    assert loss == pytest.approx(float(loss_sum) / int(n), rel=1e-6)


def test_fused_adamw_is_the_default_wherever_torch_has_it(tiny) -> None:
    """CPU parameters get torch's fused AdamW (the CPU kernel), whose update equals the
    per-tensor one within fp32 rounding."""
    from am_automodel.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    twin.load_state_dict(model.state_dict())
    section = tiny(optimizer={"lr": 1e-2, "weight_decay": 0.1}).optimizer
    fused = build_optimizer(model, section)
    assert fused.defaults["fused"] is True
    plain = build_optimizer(twin, section.model_copy(update={"fused": False}))
    assert not plain.defaults["fused"]
    x = torch.randn(8, 16)
    for _ in range(5):
        for m, opt in ((model, fused), (twin, plain)):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [1e-2, 1e3])
def test_clip_grad_norm_equals_torch_on_tensors_and_on_fsdp_dtensors(max_norm) -> None:
    """The norm and the clipped gradients equal `torch.nn.utils.clip_grad_norm_` (clipping
    and not clipping), for plain gradients and for FSDP2's DTensor gradients (world size 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from am_automodel.optim import clip_grad_norm

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def grads_of(model):
        model(x).pow(2).sum().backward()
        return model

    torch.manual_seed(0)
    ref = grads_of(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)))
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for shard in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
            if shard:
                fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
            norm = clip_grad_norm(grads_of(model).parameters(), max_norm)
            torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                grad = p.grad.full_tensor() if shard else p.grad
                torch.testing.assert_close(grad, q.grad, rtol=1e-6, atol=1e-9)
    finally:
        dist.destroy_process_group()
