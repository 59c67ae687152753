"""Expert kernels by name (`BackendConfig.experts`) and `run_experts`.

Shape legend: T tokens, K top-k, E experts, L local experts (E without
expert parallelism), N routed rows grouped by expert (sum of counts_L),
R routed rows including padding (N when not padded), D expert input width,
F expert hidden width, F2 = 2F for gated activations (F for relu2).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from am_moe.experts.activations import ACTIVATIONS
from am_moe.experts.autograd import _GroupedMLP
from am_moe.experts.rows import _GroupedRows, _matmul_operand

__all__ = ["EXPERT_IMPLS", "run_experts"]


def _run_loop(x_ND, counts_L, w_up, w_down, act, b_up, b_down):
    # unbind once: its backward stacks the per-expert grads in one go, where indexing w[g]
    # per expert would build (and sum) a full-size zero gradient for every expert.
    ups, downs = _matmul_operand(w_up).unbind(0), _matmul_operand(w_down).unbind(0)
    up_biases = b_up.unbind(0) if b_up is not None else None
    down_biases = b_down.unbind(0) if b_down is not None else None
    outs = []
    start = 0
    for g, n in enumerate(counts_L.tolist()):
        if n == 0:
            continue
        h = x_ND[start : start + n] @ ups[g]
        h = h if up_biases is None else h + up_biases[g]
        y = act(h) @ downs[g]
        outs.append(y if down_biases is None else y + down_biases[g])
        start += n
    if not outs:
        # Keep the graph connected so every expert parameter still receives a (zero) grad.
        params = [p for p in (w_up, w_down, b_up, b_down) if p is not None]
        return x_ND @ w_up[0, :, :0] @ w_down[0, :0, :] + 0 * sum(p.sum() for p in params)
    return torch.cat(outs)


def _run_grouped_mm(x_ND, counts_L, w_up, w_down, act, b_up, b_down, act_name):
    return _GroupedMLP.apply(x_ND, counts_L, w_up, w_down, b_up, b_down, act, act_name)


def _run_gmm(x_ND, counts_L, w_up, w_down, act, b_up, b_down):
    from am_dtype.backend import HAVE_GMM

    if not HAVE_GMM:
        raise ImportError("experts impl 'gmm' needs grouped_gemm; install the 'gmm' extra")
    from grouped_gemm import ops

    batch_sizes = counts_L.to("cpu")
    rows = _GroupedRows(counts_L, x_ND.device)
    h = ops.gmm(x_ND, w_up, batch_sizes, trans_b=False)
    h = h if b_up is None else h + rows.per_row(b_up)
    y = ops.gmm(act(h), w_down, batch_sizes, trans_b=False)
    return y if b_down is None else y + rows.per_row(b_down)


EXPERT_IMPLS: dict[str, Callable[..., Tensor]] = {
    "torch": _run_loop,
    "torch_mm": _run_grouped_mm,
    "gmm": _run_gmm,
}
# Kernels that also take the activation's name (to pick its closed-form gradient).
_NAMED_ACTIVATION_IMPLS = frozenset({"torch_mm"})


def run_experts(
    x_ND: Tensor,
    counts_L: Tensor,
    w_up_LDF2: Tensor,
    w_down_LFD: Tensor,
    activation: str,
    impl: str,
    b_up_LF2: Tensor | None = None,
    b_down_LD: Tensor | None = None,
    *,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> Tensor:
    """Run each local expert's MLP on its contiguous block of rows: y_ND, rows in input order.

    `counts_L[g]` rows of `x_ND` (in order) belong to local expert g; `sum(counts_L) == N`.
    """
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"experts impl={impl!r} is not supported; accepted: {list(EXPERT_IMPLS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not supported; accepted: {list(ACTIVATIONS)}"
        )
    if counts_L.numel() != w_up_LDF2.shape[0]:
        raise ValueError(
            f"counts_L has {counts_L.numel()} groups but the weights hold {w_up_LDF2.shape[0]} experts"
        )
    act = partial(ACTIVATIONS[activation], alpha=alpha, limit=limit)
    x_ND = x_ND.to(w_up_LDF2.dtype)
    args = (x_ND, counts_L, w_up_LDF2, w_down_LFD, act, b_up_LF2, b_down_LD)
    if impl in _NAMED_ACTIVATION_IMPLS:
        return EXPERT_IMPLS[impl](*args, activation)
    return EXPERT_IMPLS[impl](*args)
