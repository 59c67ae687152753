"""What NemotronHForCausalLM returns: its output class, transformers-style hidden states, the
main next-token loss, and the loss of a batch without tokens.

Hidden states follow transformers' `output_hidden_states` contract: the embeddings output,
then each decoder block's output, the last one after the final norm (transformers replaces
the last block's output by `last_hidden_state`), so `num_hidden_layers + 1` tensors. The
argument may be a bool, an int or a list of ints (indices into that tuple, negative allowed);
unselected entries are None, as in transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from am_utils.loss import IGNORE_INDEX, causal_lm_loss, next_token_targets


def want_hidden_states(argument: bool | int | Sequence[int] | None, default: bool) -> bool:
    """Whether to collect hidden states: the argument when given (overriding the config's
    `output_hidden_states` either way), else the config's value."""
    if argument is None:
        return bool(default)
    if isinstance(argument, bool):
        return argument
    return True  # an index or list of indices selects some


def select_hidden_states(
    states: list[torch.Tensor],
    last_normed: torch.Tensor,
    argument: bool | int | Sequence[int] | None,
) -> tuple[torch.Tensor | None, ...]:
    """transformers' hidden-states tuple from the collected [embeddings, block outputs...]."""
    out: list[torch.Tensor | None] = list(states)
    out[-1] = last_normed
    if argument is None or isinstance(argument, bool):
        return tuple(out)
    wanted = [argument] if isinstance(argument, int) else list(argument)
    n = len(out)
    bad = [i for i in wanted if not -n <= i < n]
    if bad:
        raise ValueError(
            f"output_hidden_states indices {bad} are out of range for {n} hidden states "
            f"(embeddings + {n - 1} layers)"
        )
    keep = {i % n for i in wanted}
    return tuple(t if i in keep else None for i, t in enumerate(out))


def empty_batch_loss(logits: torch.Tensor, per_depth: list[torch.Tensor]) -> torch.Tensor:
    """The loss of a batch with no tokens: 0, attached to the graph of every output.

    A mean over no targets is NaN, and a NaN on one rank spreads to all of them through the
    gradient all-reduce; and an expert-parallel rank without tokens must still run backward,
    through every MoE block (MTP heads included), for its peers' all-to-alls to complete.
    """
    total = logits.float().sum()
    for h in per_depth:
        total = total + h.float().sum()
    return total


@dataclass
class NemotronHCausalLMOutputWithPast(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus declared MTP fields.

    Declared (not set dynamically) so they survive layers that rebuild
    ModelOutput instances from their declared fields, such as FSDP2's
    mixed-precision output cast.
    """

    mtp_per_depth_h: list[torch.Tensor] | None = None
    mtp_loss_scaling_factor: float | None = None


def main_loss(logits, labels, seq_idx, num_items) -> torch.Tensor:
    """`causal_lm_loss`; with Trainer's `num_items_in_batch` the sum over targets divided by it,
    as transformers' loss does, so a window's microbatch losses add up to its token mean (and a
    microbatch without targets gives 0, not NaN)."""
    if num_items is None:
        return causal_lm_loss(logits, labels, seq_idx)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:-1])}"
        )
    target = next_token_targets(labels, seq_idx)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        target.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / num_items
