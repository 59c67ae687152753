"""One microbatch through the model: its summed next-token loss and its target count.

Rows carry unshifted `labels` (-100 at padding) and `seq_idx`; the targets are
`am_utils.loss.next_token_targets(labels, seq_idx)` (shifted left, nothing across a document
boundary or a row end). The trainer needs the *sum* of the token losses (the global token mean
is taken over every microbatch of every rank), hence a summed cross-entropy over those targets
rather than `causal_lm_loss`'s per-batch mean.

Context parallelism (`parallelism.cp > 1`) runs through `am_automodel.cp.ContextParallelRoot`
(the model's own CP hooks inside one forward; the FSDP2 root when combined with dp_shard /
dp_replicate). CP ranks without FSDP hold whole, identical models and `sync_cp_grads` sums
their gradients (each rank's loss covers only its tokens); under FSDP2 the reduction over the
(dp, cp) mesh does it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from am_utils.loss import IGNORE_INDEX, next_token_targets

__all__ = ["BatchRunner"]


def _summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip


class BatchRunner:
    """Runs microbatches of packed rows through `model` (see the module doc)."""

    def __init__(self, model, spec, config, device, dtype, cp_root=None,
                 cp_grads_reduced: bool = False) -> None:  # fmt: skip
        self.model, self.spec, self.config = model, spec, config
        self.device, self.dtype = device, dtype
        self.cp_root = cp_root  # a ContextParallelRoot around `model`, or None
        self.cp_grads_reduced = cp_grads_reduced  # FSDP2 reduces over the CP ranks

    @property
    def root(self):
        """The module whose forward runs a microbatch (the FSDP2 root)."""
        return self.model if self.cp_root is None else self.cp_root

    @staticmethod
    def num_targets(batch: dict) -> torch.Tensor:
        """The targets of `batch`'s whole rows (CP ranks each see a share of them), as a 0-d
        tensor on the batch's (CPU) device: counted without a host sync."""
        return (next_token_targets(batch["labels"], batch["seq_idx"]) != IGNORE_INDEX).sum()

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, number of targets) of `batch` on this rank, both 0-d tensors on
        the model's device (no host sync: the caller converts once per step)."""
        input_ids = batch["input_ids"].to(self.device)
        if self.cp_root is None:
            kwargs = self.spec.forward_inputs(batch, self.config, self.device, self.dtype)
            logits = self.model(input_ids=input_ids, **kwargs).logits
            targets = next_token_targets(batch["labels"].to(self.device),
                                         batch["seq_idx"].to(self.device))  # fmt: skip
        else:
            # CP rows are one document each (data.pack = false), so the full-sequence shift
            # the model's CP batch function does equals next_token_targets with seq_idx.
            logits, targets = self.cp_root(input_ids, batch["labels"].to(self.device))
        return _summed_ce(logits, targets), (targets != IGNORE_INDEX).sum()

    def sync_cp_grads(self) -> None:
        """Sum the gradients over the CP ranks of whole-model replicas (no-op otherwise)."""
        if self.cp_root is not None and not self.cp_grads_reduced:
            from am_automodel.cp import sum_replica_grads

            sum_replica_grads(self.model, self.cp_root.cp_mesh)
