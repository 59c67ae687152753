"""Data: documents -> tokens -> fixed-length packed rows with per-document boundaries.

- Documents come from local JSONL / JSON / text / parquet files through HF `datasets` (a text
  column, or chat messages rendered with the tokenizer's chat template), or from the built-in
  embedded dataset (`builtin_data.py`).
- Each document is `<s> tokens </s>`; documents are concatenated and cut into rows of
  `seq_len`. Every token carries its document's index within the row (`seq_idx`) and its
  position within that document (`position_ids`); `labels` are the tokens themselves (-100 at
  padding), unshifted as in transformers: the loss (`am_utils.loss.causal_lm_loss` with
  `seq_idx`) shifts them and drops each document's last position. So no document attends to
  or predicts across a boundary. The last, partial row is padded (its pad tokens form their
  own segment, label -100), never dropped.
- Order: an endless stream of seeded per-epoch permutations of the rows. The loader's whole
  state is one integer (rows consumed), so a resumed run continues mid-epoch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from am_automodel.builtin_data import builtin_documents
from am_automodel.recipe import DataSection, RecipeError
from am_utils.loss import IGNORE_INDEX

__all__ = ["PackedRows", "RowLoader", "build_datasets", "check_data_files", "pack_documents"]

_SUFFIX_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text",
                   ".parquet": "parquet"}  # fmt: skip


@dataclass
class PackedRows:
    """Packed rows: every tensor is [N, seq_len]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    seq_idx: torch.Tensor
    position_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "seq_idx": self.seq_idx[index],
            "position_ids": self.position_ids[index],
        }


# ----------------------------------------------------------------------------- files
def _format_of(key: str, path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    kinds = {_SUFFIX_FORMATS.get(p.suffix.lower()) for p in files} - {None}
    if len(kinds) != 1:
        raise RecipeError(
            f"{key} = {str(path)!r}: cannot tell the format from the file suffixes; set "
            f"data.format to one of ['json', 'text', 'parquet'] (suffixes {sorted(_SUFFIX_FORMATS)})"
        )
    return kinds.pop()


def check_data_files(section: DataSection) -> None:
    """Fail fast (before any model or process group) when a data file named is missing."""
    for key in ("path", "val_path"):
        value = getattr(section, key)
        if value is not None and not Path(value).exists():
            raise RecipeError(f"data.{key} = {value!r}: no such file or directory")
        if value is not None:
            _format_of(f"data.{key}", Path(value), section.format)


def _load_records(key: str, value: str, section: DataSection) -> list[Any]:
    """The documents (strings, or lists of chat messages) of one file or directory."""
    import datasets

    path = Path(value)
    fmt = _format_of(f"data.{key}", path, section.format)
    files = [str(p) for p in sorted(path.iterdir()) if p.is_file()] if path.is_dir() else [value]
    extra = {"sample_by": "paragraph"} if fmt == "text" else {}
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", **extra)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; name the file
        raise RecipeError(f"data.{key} = {value!r}: cannot read as {fmt} ({err})") from None
    column = section.messages_field or section.text_field
    if fmt == "text":
        column = "text"
    if column not in ds.column_names:
        which = "messages_field" if section.messages_field else "text_field"
        raise RecipeError(
            f"data.{which} = {column!r}: not a column of {value!r}; columns: {ds.column_names}"
        )
    if fmt == "text":  # paragraphs (blank-line separated), without their trailing newlines
        return [t.strip() for t in ds[column] if t.strip()]
    return list(ds[column])


# ----------------------------------------------------------------------------- tokens
def _render_chat(messages: Any, tokenizer, where: str) -> list[int]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise RecipeError(f"{where}: chat messages must be a list of {{role, content}} mappings")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    # No template (the byte tokenizer): a plain, unambiguous rendering.
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize_documents(records: list[Any], tokenizer, chat: bool, where: str) -> list[list[int]]:
    """Token ids of every document, each wrapped as `<s> ... </s>` (when the tokenizer has them)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat:
        bodies = [_render_chat(r, tokenizer, f"{where}[{i}]") for i, r in enumerate(records)]
    else:
        bad = next((i for i, r in enumerate(records) if not isinstance(r, str)), None)
        if bad is not None:
            raise RecipeError(f"{where}[{bad}]: expected text, got {type(records[bad]).__name__}")
        bodies = tokenizer(records, add_special_tokens=False)["input_ids"] if records else []
    return [bos + list(b) + eos for b in bodies if b]


def pack_documents(
    docs: list[list[int]], seq_len: int, pad_id: int, one_per_row: bool = False
) -> PackedRows:
    """Concatenate documents and cut into [N, seq_len] rows with per-document boundaries.

    `one_per_row`: each document (at most seq_len tokens) gets a row of its own instead.
    """
    if not docs:
        raise RecipeError("the dataset has no documents (after dropping empty ones)")
    if one_per_row:
        ids = torch.full((len(docs), seq_len), pad_id, dtype=torch.long)
        doc = torch.full((len(docs), seq_len), len(docs), dtype=torch.long)
        for i, d in enumerate(docs):
            ids[i, : len(d)] = torch.tensor(d)
            doc[i, : len(d)] = i
    else:
        ids = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        doc = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor([len(d) for d in docs]))
        n_rows = -(-ids.numel() // seq_len)
        pad = n_rows * seq_len - ids.numel()
        ids = torch.cat([ids, ids.new_full((pad,), pad_id)]).view(n_rows, seq_len)
        doc = torch.cat([doc, doc.new_full((pad,), len(docs))]).view(n_rows, seq_len)
    # A new segment starts at every row start and wherever the document changes.
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    seq_idx = starts.cumsum(1) - 1
    col = torch.arange(seq_len).expand(ids.shape[0], seq_len)
    start_col = torch.where(starts, col, torch.zeros_like(col)).cummax(1).values
    labels = ids.masked_fill(doc == len(docs), IGNORE_INDEX)  # padding is never a target
    return PackedRows(ids, labels, seq_idx.to(torch.int32), col - start_col)


def rows_per_document(docs: list[list[int]], seq_len: int, pad_id: int) -> PackedRows:
    """One document per row (long ones continue in further rows), right-padded.

    With right padding no real token sees a pad token (attention and Mamba are causal), so
    the model needs no boundary input at all: what pipeline stages after the first require.
    """
    pieces = [d[i : i + seq_len] for d in docs for i in range(0, len(d), seq_len)]
    return pack_documents(pieces, seq_len, pad_id, one_per_row=True)


# ----------------------------------------------------------------------------- splits
def build_datasets(
    section: DataSection, tokenizer, seed: int
) -> tuple[PackedRows, PackedRows | None]:
    """(train, validation) packed rows of the recipe; validation is None when there is none."""
    chat = section.messages_field is not None
    if section.path is None:
        records: list[Any] = builtin_documents(section.builtin_documents)
        chat = False
    else:
        records = _load_records("path", section.path, section)
    val_records: list[Any] = []
    if section.val_path is not None:
        val_records = _load_records("val_path", section.val_path, section)
    elif section.val_fraction > 0 and len(records) > 1:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(section.val_fraction * len(records))))
        held = set(order[:n_val].tolist())
        val_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pack = pack_documents if section.pack else rows_per_document
    train = pack(tokenize_documents(records, tokenizer, chat, "data.path"), section.seq_len, pad)
    val = None
    if val_records:
        val_docs = tokenize_documents(val_records, tokenizer, chat, "data.val_path")
        val = pack(val_docs, section.seq_len, pad)
    return train, val


class RowLoader:
    """Microbatches of rows for one data-parallel rank, from a seeded endless row stream.

    The stream is the concatenation of one permutation of all rows per epoch (epoch e uses
    `seed + e`); each microbatch takes the next `micro_batch_size * data_size` rows of it and
    this rank keeps its contiguous `micro_batch_size`. `state_dict()` is the number of rows
    consumed, so loading it continues the stream at the same row, mid-epoch or not.
    """

    def __init__(self, rows: PackedRows, micro_batch_size: int, data_rank: int, data_size: int,
                 seed: int, shuffle: bool = True) -> None:  # fmt: skip
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.data_rank = data_rank
        self.global_rows = micro_batch_size * data_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed = 0
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            n = len(self.rows)
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def _stream(self, start: int, count: int) -> torch.Tensor:
        n, out = len(self.rows), []
        while count > 0:
            epoch, offset = divmod(start, n)
            take = min(count, n - offset)
            out.append(self._order(epoch)[offset : offset + take])
            start, count = start + take, count - take
        return torch.cat(out)

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.rows)

    def next_batch(self) -> dict[str, torch.Tensor]:
        index = self._stream(self.consumed, self.global_rows)
        self.consumed += self.global_rows
        mine = index[
            self.data_rank * self.micro_batch_size : (self.data_rank + 1) * self.micro_batch_size
        ]
        return self.rows.rows(mine)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


def eval_batches(rows: PackedRows, micro_batch_size: int, data_rank: int, data_size: int,
                 count: int) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """The same `count` validation microbatches at every eval (fixed order, wrapping)."""
    loader = RowLoader(rows, micro_batch_size, data_rank, data_size, seed=0, shuffle=False)
    return [loader.next_batch() for _ in range(count)]
