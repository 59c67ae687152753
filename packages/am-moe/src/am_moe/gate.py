"""Routers: choose top-k experts per token and their weights.

`Gate` implements the choices both model families need:

- scores: softmax or sigmoid of `x @ weight.T (+ bias)`, in `gate_precision`
  (e.g. fp32 for bf16 activations) when the backend asks for it;
- aux-loss-free balancing: `e_score_correction_bias` (a buffer, fp32) is added
  to the scores for *selection only*; weights come from the raw scores.
  `update_bias()` moves it by `gate_bias_update_factor * sign(mean_load - load)`
  using the expert load counted since the previous update;
- group-limited routing: experts split into `n_expert_groups` groups, each token
  picks its best `n_limited_groups` groups (by the top-2 sum of biased scores when
  the correction bias exists, else by the best score) and its top-k inside them;
- weights: the selected raw scores, renormalized to sum 1 when `norm_topk_prob`,
  times `route_scale`;
- sequence-level balance loss (training only, `aux_loss_coeff > 0`):
  `coeff * mean_b sum_i f_i P_i` with, per sequence, `f_i = E / (K T) * load_i` and
  `P_i` the mean of the per-token normalized scores; padding tokens are excluded.

Shape legend: B sequences, S tokens per sequence, T = B*S tokens, D model dim,
E experts, G groups, K top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from am_dtype.dtensor import to_local
from am_moe.config import MoEConfig

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    from am_dtype.backend import BackendConfig

__all__ = ["FakeBalancedGate", "Gate"]


def _flatten(x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """x as [T, D], mask as [T] bool, and B (sequences: 1 for a 2-D x)."""
    num_seqs = x.shape[0] if x.dim() == 3 else 1
    x_TD = x.reshape(-1, x.shape[-1])
    if token_mask is None:
        mask_T = torch.ones(x_TD.shape[0], dtype=torch.bool, device=x.device)
    else:
        if token_mask.numel() != x_TD.shape[0]:
            raise ValueError(
                f"token_mask has {token_mask.numel()} entries for {x_TD.shape[0]} tokens "
                f"(x of shape {tuple(x.shape)})"
            )
        mask_T = token_mask.reshape(-1).to(torch.bool)
    return x_TD, mask_T, num_seqs


def _expert_load(indices_TK: Tensor, mask_T: Tensor, num_experts: int) -> Tensor:
    """Tokens routed to each expert, counting only unmasked tokens: [E] float32."""
    weights = mask_T.to(torch.float32).unsqueeze(-1).expand_as(indices_TK)
    return torch.zeros(num_experts, device=indices_TK.device).index_add_(
        0, indices_TK.reshape(-1), weights.reshape(-1)
    )


class Gate(nn.Module):
    """Top-k router: forward(x, token_mask, cp_mesh=None) -> (weights_TK, indices_TK, aux_loss).

    `x` is [T, D] (one sequence for the balance loss) or [B, S, D]; `token_mask`
    (True = real token) has x's leading shape. Weights are in the router's compute dtype
    (`gate_precision` when set, else x's dtype). `aux_loss` is None unless training with
    `aux_loss_coeff > 0`.
    """

    def __init__(self, config: MoEConfig, backend: BackendConfig | None = None) -> None:
        super().__init__()
        self.dim = config.dim
        self.n_experts = config.n_routed_experts
        self.topk = config.n_activated_experts
        self.n_groups = config.n_expert_groups
        self.topk_groups = config.n_limited_groups
        self.score_func = config.score_func
        self.route_scale = config.route_scale
        self.norm_topk_prob = config.norm_topk_prob
        self.train_gate = config.train_gate
        self.bias_update_factor = config.gate_bias_update_factor
        self.aux_loss_coeff = config.aux_loss_coeff
        self.gate_precision = backend.gate_precision if backend is not None else None
        self.weight = nn.Parameter(
            torch.empty(self.n_experts, self.dim, dtype=config.dtype),
            requires_grad=config.train_gate,
        )
        self.bias = (
            nn.Parameter(torch.empty(self.n_experts, dtype=config.dtype), config.train_gate)
            if config.router_bias
            else None
        )
        if config.uses_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None
        self._load_since_update: Tensor | None = None
        self._bias_master: Tensor | None = None

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, cp_mesh: DeviceMesh | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        x_TD, mask_T, num_seqs = _flatten(x, token_mask)
        scores_TE = self._scores(x_TD)
        indices_TK = self._select(scores_TE.detach())
        weights_TK = scores_TE.gather(1, indices_TK)
        if self.norm_topk_prob and self.topk > 1:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.route_scale
        if self.training and self.bias_update_factor > 0:
            load = _expert_load(indices_TK, mask_T, self.n_experts)
            prev = self._load_since_update
            self._load_since_update = load if prev is None else prev + load
        aux_loss = None
        if self.training and self.aux_loss_coeff > 0:
            aux_loss = self._aux_loss(scores_TE, indices_TK, mask_T, num_seqs, cp_mesh)
        return weights_TK, indices_TK, aux_loss

    def _scores(self, x_TD: Tensor) -> Tensor:
        dtype = self.gate_precision or x_TD.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        logits_TE = F.linear(x_TD.to(dtype), self.weight.to(dtype), bias)
        if self.score_func == "softmax":
            return logits_TE.softmax(dim=-1)
        return logits_TE.sigmoid()

    def _select(self, scores_TE: Tensor) -> Tensor:
        """Top-k experts per token, inside the token's best groups; the bias steers selection."""
        choice_TE = scores_TE
        if self.e_score_correction_bias is not None:
            choice_TE = scores_TE + self.e_score_correction_bias.to(scores_TE.dtype)
        if self.n_groups > 1:
            t = choice_TE.shape[0]
            choice_TGe = choice_TE.view(t, self.n_groups, self.n_experts // self.n_groups)
            if self.e_score_correction_bias is not None:
                top2 = min(2, choice_TGe.shape[-1])
                group_TG = choice_TGe.topk(top2, dim=-1).values.sum(dim=-1)
            else:
                group_TG = choice_TGe.amax(dim=-1)
            best_groups = group_TG.topk(self.topk_groups, dim=-1).indices
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_groups, True)
            choice_TE = choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(
                t, self.n_experts
            )
        return choice_TE.topk(self.topk, dim=-1).indices

    def _aux_loss(self, scores_TE, indices_TK, mask_T, num_seqs, cp_mesh) -> Tensor:
        maskf_T = mask_T.to(scores_TE.dtype)
        probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20) * maskf_T.unsqueeze(-1)
        probs_BE = probs_TE.view(num_seqs, -1, self.n_experts).sum(dim=1)
        hits_TE = torch.zeros_like(scores_TE).scatter_(1, indices_TK, 1.0) * maskf_T.unsqueeze(-1)
        load_BE = hits_TE.view(num_seqs, -1, self.n_experts).sum(dim=1)
        tokens_B = maskf_T.view(num_seqs, -1).sum(dim=1)
        if cp_mesh is not None:
            # Context parallelism splits each sequence: sum its pieces across the CP ranks.
            probs_BE, load_BE, tokens_B = _cp_sum(probs_BE, load_BE, tokens_B, cp_mesh)
        tokens_B = tokens_B.clamp(min=1.0).unsqueeze(-1)
        f_BE = load_BE * self.n_experts / (self.topk * tokens_B)
        p_BE = probs_BE / tokens_B
        return self.aux_loss_coeff * (f_BE * p_BE).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, process_group: ProcessGroup | None = None) -> None:
        """Move `e_score_correction_bias` toward balance using the load since the last update.

        Each expert's bias changes by `gate_bias_update_factor * sign(mean_load - load)`:
        overloaded experts become less likely to be selected, underused ones more. Pass the
        data-parallel `process_group` so every replica sums the same global load and applies
        the same step. A no-op when no training forward ran since the last update.
        """
        if self.e_score_correction_bias is None or self.bias_update_factor <= 0:
            raise RuntimeError(
                "Gate.update_bias needs gate_bias_update_factor > 0 (with train_gate=True); "
                f"got gate_bias_update_factor={self.bias_update_factor}"
            )
        load_E, self._load_since_update = self._load_since_update, None
        if load_E is None:
            return
        if process_group is not None:
            torch.distributed.all_reduce(load_E, group=process_group)
        step_E = torch.sign(load_E.mean() - load_E) * self.bias_update_factor
        bias = self.e_score_correction_bias
        if bias.dtype == torch.float32:
            bias += step_E.to(bias.device)
            return
        # A model cast to bf16 casts this buffer too; steps of ~1e-3 would round away, so
        # accumulate in an fp32 master copy and copy it in.
        if self._bias_master is None:
            self._bias_master = bias.float()
        self._bias_master += step_E.to(bias.device)
        bias.copy_(self._bias_master)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """Normal(0, init_std) router weight; zero router bias and correction bias."""
        to_local(self.weight).normal_(0.0, init_std)
        if self.bias is not None:
            to_local(self.bias).zero_()
        if self.e_score_correction_bias is not None:
            device = buffer_device or self.e_score_correction_bias.device
            self.e_score_correction_bias = torch.zeros(self.n_experts, device=device)
        self._load_since_update = None
        self._bias_master = None


def _cp_sum(probs_BE: Tensor, load_BE: Tensor, tokens_B: Tensor, cp_mesh: DeviceMesh):
    """Sum per-rank partial statistics over the CP ranks (DTensor Partial -> Replicate).

    As in the reference, the backward hands each rank the gradient of its own tokens
    only (no sum over ranks): summing parameter grads over CP ranks gives the full grad.
    """
    from torch.distributed.tensor import DTensor, Partial

    def total(t: Tensor) -> Tensor:
        return DTensor.from_local(t, device_mesh=cp_mesh, placements=[Partial()]).full_tensor()

    counts = total(torch.cat([load_BE, tokens_B.unsqueeze(-1)], dim=-1))
    return total(probs_BE), counts[:, :-1], counts[:, -1]


class FakeBalancedGate(nn.Module):
    """Benchmark router: spreads tokens evenly over experts, ignoring x.

    Token t takes experts (t*K + k) mod E with weight 1/K. With `noise` > 0 each token's
    choice is perturbed: experts are re-ranked by `balanced_preference + noise * randn`, so
    loads become uneven in a controlled way. Returns no aux loss; `update_bias` is a no-op.
    """

    def __init__(self, config: MoEConfig, noise: float = 0.0) -> None:
        super().__init__()
        if noise < 0:
            raise ValueError(f"FakeBalancedGate noise={noise} must be >= 0")
        self.n_experts = config.n_routed_experts
        self.topk = config.n_activated_experts
        self.noise = noise

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, cp_mesh: DeviceMesh | None = None
    ) -> tuple[Tensor, Tensor, None]:
        x_TD, _, _ = _flatten(x, token_mask)
        t = x_TD.shape[0]
        slots = torch.arange(t * self.topk, device=x.device).view(t, self.topk)
        indices_TK = slots % self.n_experts
        if self.noise > 0:
            pref_TE = torch.zeros(t, self.n_experts, device=x.device)
            pref_TE.scatter_(1, indices_TK, 1.0)
            pref_TE += self.noise * torch.randn_like(pref_TE)
            indices_TK = pref_TE.topk(self.topk, dim=-1).indices
        weights_TK = torch.full((t, self.topk), 1.0 / self.topk, dtype=x.dtype, device=x.device)
        return weights_TK, indices_TK, None

    def update_bias(self, process_group: ProcessGroup | None = None) -> None:
        """No bias to update."""

    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """No weights to initialize."""
