"""Routed experts: stacked expert weights and the kernels that run them.

`GroupedExperts` keeps every expert's weights in two stacked parameters and
runs them on rows that a token dispatcher has grouped by expert:

- `gate_and_up_projs` [E, D, 2F] for gated activations (columns [:F] are the
  gate half, [F:] the up half) or [E, D, F] for "relu2";
- `down_projs` [E, F, D];
- optional `gate_up_proj_bias` [E, 2F or F] and `down_proj_bias` [E, D].

Weights are stored input-major (x @ w), so one expert's projection is a plain
matmul and the stack is a grouped matmul. `run_experts` picks a kernel by
name (`BackendConfig.experts`):

- "torch": a per-expert loop of matmuls under ordinary autograd.
- "torch_mm": one `torch._grouped_mm` per projection with offsets from the
  per-expert counts, inside a custom autograd function that keeps only the
  input rows and the pre-activation for backward and recomputes the
  activation there (the grad is made contiguous: `_grouped_mm` rejects the
  stride-0 grads that `y.sum().backward()` produces). Without expert
  parallelism `GroupedExperts` runs gather -> experts -> weighted sum as one
  autograd function (`_LocalMoE`): the routing weight scales the N x F
  activation instead of the N x D output, and neither the gathered rows nor
  the unweighted outputs are kept for backward. On CPU, when the experts'
  loads are within 12.5% of each other, rows are laid out in equal padded
  blocks and each projection is one `torch.bmm` (`_PaddedRows`): one parallel
  region instead of one per expert, which keeps its speed when other
  processes share the cores; otherwise every expert's first min(load) rows
  run as one `torch.bmm` and the rest as a grouped matmul (`_SplitRows`). At one
  fp32/fp64 thread the rows stay grouped and each expert's block goes through its whole MLP
  (and backward) before the next one (`blocks`), while it is in the CPU caches.
- "gmm": grouped_gemm's GPU kernel (the `gmm` extra), imported only when used.
- "te" and "torch_mm_mxfp8" (names the seed pages list) are rejected by `BackendConfig`:
  TE's grouped linear keeps one weight per expert, and there is no MXFP8 grouped GEMM here.

Shape legend: T tokens, K top-k, E experts, L local experts (E without
expert parallelism), N routed rows grouped by expert (sum of counts_L),
R routed rows including padding (N when not padded), D expert input width,
F expert hidden width, F2 = 2F for gated activations (F for relu2).

Files, one job each: `activations` (activation functions and their gradients), `rows` (row
layouts, routing plan, CPU workspace), `autograd` (the custom autograd functions),
`blocks` (the expert-by-expert CPU loop), its fp32 matmul is `am_dtype.cpu_gemm`'s (torch.mm or
oneDNN's, `BackendConfig.cpu_gemm`), `kernels` (kernels by name, `run_experts`),
`module` (`GroupedExperts`), `native` (fused C kernels for the geglu / relu2 activation of
the expert-by-expert loop, built on first use; `GroupedExperts.cpu_kernels`). Every public name
is re-exported here, so `am_moe.experts.GroupedExperts` and friends keep working.
"""

from am_moe.experts.activations import ACTIVATIONS, apply_activation
from am_moe.experts.kernels import EXPERT_IMPLS, run_experts
from am_moe.experts.module import GroupedExperts
from am_moe.experts.rows import CPU_LAYOUTS  # noqa: F401  (the layout names; see rows)

__all__ = [
    "ACTIVATIONS",
    "EXPERT_IMPLS",
    "GroupedExperts",
    "apply_activation",
    "run_experts",
]
