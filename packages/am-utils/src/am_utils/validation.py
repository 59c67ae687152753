"""Checks of a causal LM's inputs at the model boundary, shared by every model package.

Each check raises a ``ValueError`` (``TypeError`` for a wrong kind of argument) that names
the argument, the value or shape it got and what is accepted, so bad input never runs on
silently. They are cheap and run once per forward, not per layer:

- Shape and dtype checks read tensor metadata only (no device work).
- Checks of tensor *values* (token ids inside the vocabulary, ``cu_seqlens`` / ``seq_idx``
  ordering) need the values on the host. For CPU tensors that is free, so they always run;
  for accelerator tensors it would be a device sync per forward, so they run only when
  ``AM_VALIDATE_INPUTS=1`` is set in the environment (or inside ``validate_values(True)``).
  Without the check an out-of-vocabulary id on CUDA is a device-side assert in the
  embedding, which is why the flag exists for debugging runs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "check_cu_seqlens",
    "check_generate_inputs",
    "check_input_ids",
    "check_logits_to_keep",
    "check_mask_shape",
    "check_seq_idx",
    "require_attributes",
    "validate_values",
    "values_checkable",
    "warn_unknown_kwargs",
]

logger = logging.getLogger(__name__)

_ENV_FLAG = "AM_VALIDATE_INPUTS"
_override = threading.local()


@contextmanager
def validate_values(enabled: bool = True):
    """Within the block, check tensor values on accelerators too (``True``) or never (``False``)."""
    previous = getattr(_override, "value", None)
    _override.value = enabled
    try:
        yield
    finally:
        _override.value = previous


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether value checks should read ``tensor``: always on CPU, on other devices only when
    ``AM_VALIDATE_INPUTS=1`` or inside ``validate_values(True)`` (reading them is a sync)."""
    override = getattr(_override, "value", None)
    if override is not None:
        return override
    if tensor.device.type in ("cpu", "meta"):
        return tensor.device.type == "cpu"
    return os.environ.get(_ENV_FLAG, "0").lower() in ("1", "true", "yes")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_input_ids(
    input_ids: torch.Tensor, vocab_size: int | None, *, allow_1d: bool = False
) -> None:
    """``input_ids`` is an integer [batch, seq] tensor ([T] too when ``allow_1d``) whose ids lie
    in ``[0, vocab_size)`` (the range is checked when ``values_checkable``)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    accepted = "[batch, seq]" + (" or a packed [T] with cu_seqlens / seq_idx" if allow_1d else "")
    if input_ids.dim() != 2 and not (allow_1d and input_ids.dim() == 1):
        raise ValueError(f"input_ids must be {accepted}; got shape {_shape(input_ids)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if vocab_size is None or input_ids.numel() == 0 or not values_checkable(input_ids):
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size}) "
            f"(min {low}, max {high})"
        )


def check_mask_shape(
    mask: torch.Tensor | None, name: str, accepted: Iterable[tuple[int, ...]]
) -> None:
    """``mask`` (when given) has one of the ``accepted`` shapes; the error lists them all."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    accepted = list(dict.fromkeys(tuple(s) for s in accepted))
    if tuple(mask.shape) not in accepted:
        listed = " or ".join(str(list(s)) for s in accepted)
        raise ValueError(f"{name} must have shape {listed}; got {_shape(mask)}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, force: bool = False) -> list[int] | None:
    """Cumulative sequence lengths: 1-D (or [1, N + 1]) integers that start at 0, strictly
    increase and end at ``total``, the number of tokens in the packed batch.

    Values are read when ``values_checkable`` (or ``force``: a caller that needs them on the
    host anyway, e.g. for Transformer Engine's ``max_seqlen``); they are returned then."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() == 2 and cu_seqlens.shape[0] == 1:
        cu_seqlens = cu_seqlens[0]
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be [N + 1] (0, then each sequence's end) with N >= 1; "
            f"got shape {_shape(cu_seqlens)}"
        )
    if not (force or values_checkable(cu_seqlens)):
        return None
    values = cu_seqlens.tolist()
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    if values[0] != 0 or values[-1] != total or min(steps) <= 0:
        raise ValueError(
            f"cu_seqlens must start at 0, strictly increase and end at the {total} tokens of "
            f"the batch; got {_abbreviate(values)}"
        )
    return values


def check_seq_idx(seq_idx: torch.Tensor, batch: int, seq: int) -> None:
    """Packed-sequence index [batch or 1, seq] (or [seq]): integers, each row starting at 0 and
    stepping by 0 (same sequence) or 1 (the next one), as the Mamba kernels expect."""
    if not isinstance(seq_idx, torch.Tensor):
        raise TypeError(f"seq_idx must be a torch.Tensor, got {type(seq_idx).__name__}")
    if seq_idx.is_floating_point() or seq_idx.dtype == torch.bool:
        raise TypeError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    rows = seq_idx.unsqueeze(0) if seq_idx.dim() == 1 else seq_idx
    if rows.dim() != 2 or rows.shape[0] not in (1, batch) or rows.shape[1] != seq:
        raise ValueError(
            f"seq_idx must have shape [{batch}, {seq}] (or [1, {seq}] / [{seq}]); "
            f"got {_shape(seq_idx)}"
        )
    if seq == 0 or not values_checkable(rows):
        return
    first = rows[:, 0]
    steps = rows[:, 1:] - rows[:, :-1]
    ok = bool((first == 0).all()) and bool(((steps == 0) | (steps == 1)).all())
    if not ok:
        row = next(
            i
            for i in range(rows.shape[0])
            if rows[i, 0] != 0 or not ((steps[i] == 0) | (steps[i] == 1)).all()
        )
        raise ValueError(
            "seq_idx must start at 0 in every row and step by 0 or 1 (each packed sequence "
            f"one contiguous run, numbered in order); row {row} is {_abbreviate(rows[row].tolist())}"
        )


def check_logits_to_keep(logits_to_keep: Any) -> None:
    """An int >= 0 (0 = every position) or an index tensor, as transformers accepts."""
    if isinstance(logits_to_keep, torch.Tensor):
        return
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
        raise TypeError(
            f"logits_to_keep must be an int >= 0 or an index tensor, got {logits_to_keep!r}"
        )
    if logits_to_keep < 0:
        raise ValueError(
            f"logits_to_keep must be >= 0 (0 keeps every position, k > 0 the last k); "
            f"got {logits_to_keep}"
        )


_WARNED_KWARGS: set[tuple[str, str]] = set()


def warn_unknown_kwargs(kwargs: Mapping[str, Any], known: Iterable[str], where: str) -> list[str]:
    """Log a warning, once per (``where``, name), for keyword arguments not in ``known``;
    returns the unknown names. A misspelt argument (``attn_mask``) is then never ignored in
    silence, while the caller keeps accepting it (transformers passes extras freely)."""
    known = set(known)
    unknown = sorted(k for k in kwargs if k not in known)
    fresh = [k for k in unknown if (where, k) not in _WARNED_KWARGS]
    if fresh:
        _WARNED_KWARGS.update((where, k) for k in fresh)
        logger.warning(
            "%s ignores unknown keyword arguments %s (accepted: %s)", where, fresh, sorted(known)
        )
    return unknown


def check_generate_inputs(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> None:
    """A generate() prompt: [batch, seq] ids with seq > 0 (or [batch, seq, hidden] embeddings
    with an empty or matching ``input_ids``) and a 2-D mask of the prompt's shape."""
    if inputs_embeds is not None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(
                "generate(inputs_embeds=...) needs a [batch, seq, hidden] prompt with seq > 0; "
                f"got shape {_shape(inputs_embeds)}"
            )
        prompt = tuple(inputs_embeds.shape[:2])
    elif input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(
                "generate() needs input_ids of shape [batch, seq] (a 1-D prompt needs "
                f"input_ids[None]); got shape {_shape(input_ids)}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError(
                f"generate() got an empty prompt (input_ids shape {_shape(input_ids)}); pass at "
                "least one token, or inputs_embeds"
            )
        prompt = tuple(input_ids.shape)
    else:
        return
    if attention_mask is not None and tuple(attention_mask.shape) != prompt:
        raise ValueError(
            f"generate() got attention_mask of shape {_shape(attention_mask)} for a prompt of "
            f"shape {list(prompt)}; it must be [batch, seq] of the prompt (1 = token, 0 = pad)"
        )


def require_attributes(obj: Any, names: Iterable[str], what: str) -> None:
    """Raise one ``AttributeError`` listing every name in ``names`` that ``obj`` lacks."""
    missing = [n for n in dict.fromkeys(names) if not hasattr(obj, n)]
    if missing:
        raise AttributeError(
            f"{type(obj).__name__} config lacks attributes needed by {what}: {missing}"
        )


def _abbreviate(values: list, limit: int = 12) -> str:
    if len(values) <= limit:
        return str(values)
    head = ", ".join(map(str, values[: limit // 2]))
    tail = ", ".join(map(str, values[-limit // 2 :]))
    return f"[{head}, ..., {tail}] ({len(values)} values)"
