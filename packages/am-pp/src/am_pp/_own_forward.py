"""The padding mask of a model that keeps its own forward, carried to every pipeline stage.

`PipelineStage` hands a microbatch's keyword inputs to the first stage only; later stages
get the previous stage's outputs, positionally. The patched HF forwards (`_forwards.py`)
put the attention mask in that tuple themselves; a model that keeps its own PP-aware
forward (`model_keeps_self_forward`, our Nemotron-H) does not, and would run its later
stages unpadded. `MaskCarryingStage` wraps such a stage for `PipelineStage`: the first stage
takes `attention_mask=` as the model's own forward does and appends the mask (int64 0/1,
[batch, seq]; all ones when none was given) to its outputs; each later stage takes it off
the end of its positional inputs and calls the model with `attention_mask=` again, so every
stage's attention and Mamba blocks see the padding exactly as the unpipelined model does.
The last stage's outputs are the model's own. An all-ones mask is what HF forwards treat as
no mask (Nemotron-H's `token_mask_from` gives None for it), so unpadded batches run as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CARRIED_MASK_DTYPE = torch.long


def carried_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """The [batch, seq] int64 0/1 mask the first stage sends on (ones when none was given)."""
    if attention_mask is None:
        return torch.ones(input_ids.shape[:2], dtype=CARRIED_MASK_DTYPE, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else None
        raise ValueError(
            f"attention_mask of shape {shape} (type {type(attention_mask).__name__}): a model "
            "that keeps its own forward takes a 2-D [batch, seq] padding mask (1 = token, "
            "0 = padding) under pipeline parallelism"
        )
    if tuple(attention_mask.shape) != tuple(input_ids.shape[:2]):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
            f"{tuple(input_ids.shape[:2])}"
        )
    return attention_mask.ne(0).to(CARRIED_MASK_DTYPE)


class MaskCarryingStage(nn.Module):
    """`PipelineStage`'s module for one stage of a model that keeps its own forward: the
    stage plus the attention mask travelling as its last positional input / output (see the
    module docstring). Parameters keep their names under `.stage`."""

    def __init__(self, stage: nn.Module, is_first: bool, is_last: bool):
        super().__init__()
        self.stage = stage
        self.is_first = is_first
        self.is_last = is_last

    def forward(self, *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        if self.is_first:
            mask = carried_mask(attention_mask, args[0])
            # The user's mask as given: the model's own handling of it (dtype, all-ones).
            out = self.stage(*args, attention_mask=attention_mask, **kwargs)
        else:
            if not args or args[-1].dtype != CARRIED_MASK_DTYPE:
                raise TypeError(
                    "a later pipeline stage expects the carried attention mask as its last "
                    f"positional input; got {len(args)} inputs"
                )
            *args, mask = args
            # Multi-stage schedules also hand a rank's later stages the microbatch's root
            # kwargs (the same mask): the carried one is used.
            out = self.stage(*args, attention_mask=mask, **kwargs)
        if self.is_last:
            return out
        return (*out, mask) if isinstance(out, tuple) else (out, mask)

    def static_metas(self, microbatch_size: int, seq_len: int, dtype: torch.dtype):
        """The stage's `get_pipeline_stage_metas` shapes plus the carried mask's."""
        inputs, outputs = self.stage.get_pipeline_stage_metas(
            self.is_first, microbatch_size, seq_len, dtype
        )
        mask = torch.empty(microbatch_size, seq_len, dtype=CARRIED_MASK_DTYPE, device="meta")
        if not self.is_first:
            inputs = (*inputs, mask)
        if not self.is_last:
            outputs = (*outputs, mask)
        return inputs, outputs
