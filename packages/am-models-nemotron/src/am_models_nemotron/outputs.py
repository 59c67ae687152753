"""What NemotronHForCausalLM returns beyond logits: transformers-style hidden states, and the
loss of a batch without tokens.

Hidden states follow transformers' `output_hidden_states` contract: the embeddings output,
then each decoder block's output, the last one after the final norm (transformers replaces
the last block's output by `last_hidden_state`), so `num_hidden_layers + 1` tensors. The
argument may be a bool, an int or a list of ints (indices into that tuple, negative allowed);
unselected entries are None, as in transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
