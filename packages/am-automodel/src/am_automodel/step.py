"""One microbatch through the model: its summed next-token loss and its target count.

Rows carry unshifted `labels` (-100 at padding) and `seq_idx`; the targets are
`am_utils.loss.next_token_targets(labels, seq_idx)` (shifted left, nothing across a document
boundary or a row end). The trainer needs the *sum* of the token losses (the global token mean
is taken over every microbatch of every rank), hence a summed cross-entropy over those targets
rather than `causal_lm_loss`'s per-batch mean.

Context parallelism (`parallelism.cp > 1`) goes through the model's own hooks: the model
embeds the full sequence (`prepare_model_inputs_for_cp`), its `_cp_make_batch_fn` keeps this
rank's load-balanced share of the sequence (and shifts the labels on the full sequence first),
and `setup_cp_attention(cp_mesh)` makes its attention span every CP rank's keys. The CP ranks
hold whole, identical models (CP is not combined with FSDP yet: the embedding runs outside
the root module's forward, where FSDP2 would not gather its weight); `sync_cp_grads` sums
their gradients (each rank's loss covers only its tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from am_utils.loss import IGNORE_INDEX, next_token_targets

__all__ = ["BatchRunner"]


def _summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip


class BatchRunner:
    """Runs microbatches of packed rows through `model` (see the module doc)."""

    def __init__(self, model, spec, config, device, dtype, cp_mesh=None) -> None:
        self.model, self.spec, self.config = model, spec, config
        self.device, self.dtype = device, dtype
        self.cp_mesh = cp_mesh if cp_mesh is not None and cp_mesh.size() > 1 else None
        if self.cp_mesh is not None:
            model.setup_cp_attention(self.cp_mesh)

    @staticmethod
    def num_targets(batch: dict) -> torch.Tensor:
        """The targets of `batch`'s whole rows (CP ranks each see a share of them), as a 0-d
        tensor on the batch's (CPU) device: counted without a host sync."""
        return (next_token_targets(batch["labels"], batch["seq_idx"]) != IGNORE_INDEX).sum()

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, number of targets) of `batch` on this rank, both 0-d tensors on
        the model's device (no host sync: the caller converts once per step)."""
        input_ids = batch["input_ids"].to(self.device)
        if self.cp_mesh is None:
            kwargs = self.spec.forward_inputs(batch, self.config, self.device, self.dtype)
            logits = self.model(input_ids=input_ids, **kwargs).logits
            targets = next_token_targets(batch["labels"].to(self.device),
                                         batch["seq_idx"].to(self.device))  # fmt: skip
        else:
            # CP rows are one document each (data.pack = false), so the full-sequence shift
            # the model's CP batch function does equals next_token_targets with seq_idx.
            inputs = self.model.prepare_model_inputs_for_cp(input_ids)
            make_batch = inputs.pop("_cp_make_batch_fn")
            inputs["labels"] = batch["labels"].to(self.device)
            shard = make_batch(self.cp_mesh, None, inputs)
            targets = shard.pop("shift_labels")
            logits = self.model(**shard).logits
        return _summed_ce(logits, targets), (targets != IGNORE_INDEX).sum()

    def sync_cp_grads(self) -> None:
        """Sum the gradients over the CP ranks (no-op without CP)."""
        if self.cp_mesh is None:
            return
        group = self.cp_mesh.get_group()
        for param in self.model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)
