"""LocalDispatcher and dispatcher selection, single process.

The reference is the dense definition y_t = sum_k w_tk * (x_t @ W[e_tk]), computed token by
token in float64; dispatch -> per-expert matmul -> combine must equal it in value and in the
gradients to x, to the expert weights and to the routing weights.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from am_dtype.backend import BackendConfig
from am_moe.dispatch import (
    DeepEPDispatcher,
    HybridEPDispatcher,
    LocalDispatcher,
    TokenDispatcher,
    UCCLEPDispatcher,
    build_dispatcher,
)

T, D, E, K = 37, 8, 6, 3


def _routing(seed: int = 0, t: int = T, e: int = E, k: int = K):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(t, D, generator=g, dtype=torch.float64)
    w_EDD = torch.randn(e, D, D, generator=g, dtype=torch.float64)
    scores = torch.rand(t, e, generator=g)
    indices_TK = scores.topk(k, dim=-1).indices
    weights_TK = torch.rand(t, k, generator=g, dtype=torch.float64)
    return x_TD, w_EDD, weights_TK, indices_TK


def _dense(x_TD, w_EDD, weights_TK, indices_TK, mask_T=None):
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(D, dtype=x_TD.dtype)
        if mask_T is None or bool(mask_T[t]):
            for k in range(indices_TK.shape[1]):
                acc = acc + weights_TK[t, k] * (x_TD[t] @ w_EDD[indices_TK[t, k]])
        rows.append(acc)
    return torch.stack(rows)


def _via_dispatcher(disp: TokenDispatcher, x_TD, w_EDD, weights_TK, indices_TK, mask_T=None):
    x_ND, counts_L, ctx = disp.dispatch(x_TD, weights_TK, indices_TK, mask_T)
    assert counts_L.dtype == torch.int64 and int(counts_L.sum()) == x_ND.shape[0]
    y_ND = torch.cat([xe @ w_EDD[e] for e, xe in enumerate(torch.split(x_ND, counts_L.tolist()))])
    return disp.combine(y_ND, ctx)


def _grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    # A non-uniform upstream gradient, so a permutation error cannot cancel out.
    probe = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * probe).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("masked", [False, True])
def test_local_dispatcher_matches_dense_reference(masked):
    x_TD, w_EDD, weights_TK, indices_TK = _routing()
    mask_T = torch.rand(T, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    disp = LocalDispatcher(E)

    def ours(x, w, wt):
        return _via_dispatcher(disp, x, w, wt, indices_TK, mask_T)

    def ref(x, w, wt):
        return _dense(x, w, wt, indices_TK, mask_T)

    out, grads = _grads(ours, x_TD, w_EDD, weights_TK)
    ref_out, ref_grads = _grads(ref, x_TD, w_EDD, weights_TK)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, g, rg in zip(("x", "experts", "routing weights"), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")
    if masked:
        assert torch.all(out[~mask_T] == 0)
        assert torch.all(grads[0][~mask_T] == 0)


def test_local_dispatcher_groups_rows_by_expert_in_order():
    x_TD = torch.arange(4, dtype=torch.float32).reshape(4, 1).expand(4, 2).contiguous()
    indices_TK = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    weights_TK = torch.ones(4, 2)
    mask_T = torch.tensor([True, True, False, True])
    x_ND, counts_L, _ = LocalDispatcher(4).dispatch(x_TD, weights_TK, indices_TK, mask_T)
    assert counts_L.tolist() == [3, 1, 2, 0]
    # Expert 0 gets tokens 0, 1, 3; expert 1 token 1; expert 2 tokens 0, 3; token 2 is masked.
    assert x_ND[:, 0].tolist() == [0.0, 1.0, 3.0, 1.0, 0.0, 3.0]


def test_local_dispatcher_all_masked_and_unused_experts():
    x_TD, w_EDD, weights_TK, indices_TK = _routing(t=5)
    disp = LocalDispatcher(E)
    mask_T = torch.zeros(5, dtype=torch.bool)
    x_ND, counts_L, ctx = disp.dispatch(x_TD, weights_TK, indices_TK, mask_T)
    assert x_ND.shape == (0, D) and counts_L.tolist() == [0] * E
    assert torch.equal(disp.combine(x_ND, ctx), torch.zeros(5, D, dtype=x_TD.dtype))


def test_local_dispatcher_rejects_bad_routing():
    x_TD, _, weights_TK, indices_TK = _routing()
    disp = LocalDispatcher(E)
    with pytest.raises(ValueError, match=r"expert indices must lie in \[0, 6\)"):
        disp.dispatch(x_TD, weights_TK, indices_TK + E, None)
    with pytest.raises(ValueError, match="must both be"):
        disp.dispatch(x_TD, weights_TK[:, :2], indices_TK, None)
    with pytest.raises(ValueError, match="num_experts=0"):
        LocalDispatcher(0)


def test_build_dispatcher_without_ep_is_local():
    disp = build_dispatcher(BackendConfig(dispatcher="torch"), 8)
    assert isinstance(disp, LocalDispatcher) and disp.num_local_experts == 8


def _backend(dispatcher: str) -> BackendConfig:
    backend = BackendConfig(dispatcher="torch")
    # BackendConfig itself refuses GPU dispatchers whose package is missing; set it afterwards
    # to reach the dispatcher's own checks.
    backend.dispatcher = dispatcher
    return backend


@pytest.mark.parametrize(
    ("name", "cls", "source"),
    [
        ("deepep", DeepEPDispatcher, "github.com/deepseek-ai/DeepEP"),
        ("hybridep", HybridEPDispatcher, "github.com/deepseek-ai/DeepEP"),
        ("uccl_ep", UCCLEPDispatcher, "github.com/uccl-project/uccl"),
    ],
)
def test_gpu_dispatchers_fall_back_without_ep_and_say_how_to_get_the_library(name, cls, source):
    with pytest.warns(UserWarning, match=f"dispatcher='{name}' needs expert parallelism"):
        disp = build_dispatcher(_backend(name), 8)
    assert isinstance(disp, LocalDispatcher)
    if importlib.util.find_spec(cls.package) is None:
        # No extra installs these libraries: the error says how to build them instead.
        with pytest.raises(ImportError, match=f"build .* from source .*{source}") as err:
            cls(8, None)
        assert "extra" not in str(err.value) and "pip install" not in str(err.value)


# Installed libraries whose Python API is not the one the dispatchers drive: DeepEP V2 built
# without the legacy `Buffer` (it sets `deep_ep.Buffer = None`) and has no `HybridEPBuffer`;
# an old UCCL whose `uccl.ep.Buffer` is the native class without DeepEP's Python methods.
_INCOMPATIBLE = {
    "deep_ep/__init__.py": "Buffer = None\n",
    "uccl/__init__.py": "",
    "uccl/ep/__init__.py": "class Buffer:\n    def dispatch(self): ...\n",
}


@pytest.fixture
def incompatible_libraries(tmp_path, monkeypatch):
    for rel, text in _INCOMPATIBLE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    names = ("deep_ep", "uccl", "uccl.ep")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for n in names:
        sys.modules.pop(n, None)
    sys.modules.update(saved)


@pytest.mark.parametrize(
    ("cls", "what"),
    [
        (DeepEPDispatcher, "deep_ep.Buffer"),
        (HybridEPDispatcher, "deep_ep.HybridEPBuffer"),
        (UCCLEPDispatcher, "uccl.ep.Buffer"),
    ],
)
def test_gpu_dispatchers_reject_an_installed_library_without_the_api(
    incompatible_libraries, cls, what
):
    with pytest.raises(ImportError, match=rf"drives {what} .*lacks") as err:
        cls(8, None)
    if cls is UCCLEPDispatcher:
        assert "get_dispatch_layout" in str(err.value)  # the missing methods are named


def test_build_dispatcher_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"dispatcher='nccl' is not supported; accepted: \["):
        build_dispatcher(_backend("nccl"), 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_local_dispatcher_on_cuda_matches_cpu():
    x_TD, w_EDD, weights_TK, indices_TK = _routing()
    mask_T = torch.arange(T) % 5 != 0
    disp = LocalDispatcher(E)
    cpu = _via_dispatcher(disp, x_TD, w_EDD, weights_TK, indices_TK, mask_T)
    args = (t.cuda() for t in (x_TD, w_EDD, weights_TK, indices_TK, mask_T))
    gpu = _via_dispatcher(disp, *args)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
