"""Context parallelism in `automodel train`: the module that runs one CP microbatch.

The model owns CP (`setup_cp_attention`, `prepare_model_inputs_for_cp`, the batch function
it returns): it embeds the full rows, keeps this rank's load-balanced share of the sequence
(and shifts the labels on the full sequence first), and its attention spans every CP rank's
keys. `ContextParallelRoot.forward` chains those calls, so the embedding runs inside a
forward. That is what makes CP combine with FSDP2: the root is this module, its forward
gathers the root's weights (embeddings, tied lm_head, final norm) before the embedding runs,
and since its inputs carry no gradient, FSDP2 reduces the root's gradients once after the
whole backward, the embedding lookup's included. (With the model as the FSDP root the
embedding would run outside any forward, on sharded weights, and the root's gradients would
be reduced as soon as the gradient reached `inputs_embeds`, before the lookup's part.)

Gradient reduction: the CP ranks of one data coordinate read the same rows, and each one's
loss covers its share of the tokens, so a parameter's gradient is the *sum* over CP ranks.
With FSDP2 the mesh is (dp_replicate, dp_shard, cp): every rank holds a shard, and FSDP's
average over dp*cp ranks is undone by the loss scale (`grad_ranks`). Without FSDP the CP
ranks hold whole, identical models and `sum_replica_grads` all-reduces over the CP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from am_moe.fsdp_mixin import MoEFSDPSyncMixin

__all__ = ["ContextParallelRoot", "sum_replica_grads"]


class ContextParallelRoot(nn.Module, MoEFSDPSyncMixin):
    """`forward(input_ids, labels) -> (logits, targets)` of this CP rank's share of the rows.

    `model` keeps its own parameter names (this wrapper adds the prefix `model.` only to its
    own state dict, which nothing saves: checkpoints and exports use `model`). As the FSDP2
    root it also takes the gradient-accumulation calls (`MoEFSDPSyncMixin`), so the root's
    own reduction waits for the last microbatch like every other unit's."""

    def __init__(self, model: nn.Module, cp_mesh) -> None:
        super().__init__()
        self.model = model
        self.cp_mesh = cp_mesh
        self.backend = getattr(model, "backend", None)  # read by MoEFSDPSyncMixin
        model.setup_cp_attention(cp_mesh)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        inputs = self.model.prepare_model_inputs_for_cp(input_ids)
        make_batch = inputs.pop("_cp_make_batch_fn")
        inputs["labels"] = labels
        shard = make_batch(self.cp_mesh, None, inputs)
        targets = shard.pop("shift_labels")
        return self.model(**shard).logits, targets


def sum_replica_grads(model: nn.Module, cp_mesh) -> None:
    """Sum the gradients of whole-model CP replicas over the CP group (no FSDP)."""
    group = cp_mesh.get_group()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
