"""Data: files through HF datasets, chat rendering, packing boundaries, seeded resumable order;
and the packed rows reach the model so no document attends across a boundary."""

from __future__ import annotations

import json

import pytest
import torch

from am_automodel.data import (
    IGNORE_INDEX,
    RowLoader,
    build_datasets,
    check_data_files,
    pack_documents,
)
from am_automodel.recipe import DataSection, RecipeError
from am_automodel.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from am_utils.loss import next_token_targets


def test_byte_tokenizer_round_trips_any_text(tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = byte_tokenizer()
    text = "héllo, wörld\n\t✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [3 + b for b in text.encode()] and len(tok) == BYTE_VOCAB_SIZE
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.decode(ids) == text and again.eos_token_id == 2 and again.bos_token_id == 1


def test_packing_keeps_documents_apart() -> None:
    docs = [[1, 10, 11, 2], [1, 20, 2], [1, 30, 31, 32, 2]]
    rows = pack_documents(docs, seq_len=5, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 10, 11, 2, 1], [20, 2, 1, 30, 31], [32, 2, 0, 0, 0]]
    assert rows.seq_idx.tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    N = IGNORE_INDEX
    # labels are unshifted (transformers' convention), padding never a target
    assert rows.labels.tolist() == [[1, 10, 11, 2, 1], [20, 2, 1, 30, 31], [32, 2, N, N, N]]
    # the loss's targets: the next token only within a document; never across a document or
    # row end; no pad targets
    targets = next_token_targets(rows.labels, rows.seq_idx)
    assert targets.tolist() == [[10, 11, 2, N, N], [2, N, 30, 31, N], [2, N, N, N, N]]


def test_row_order_is_seeded_and_resumes_mid_epoch() -> None:
    rows = pack_documents([[1, i, 2] for i in range(3, 40)], seq_len=4, pad_id=0)
    a = RowLoader(rows, micro_batch_size=2, data_rank=0, data_size=2, seed=5)
    first = [a.next_batch()["input_ids"] for _ in range(20)]  # spans several epochs
    b = RowLoader(rows, micro_batch_size=2, data_rank=0, data_size=2, seed=5)
    for _ in range(7):
        b.next_batch()
    c = RowLoader(rows, micro_batch_size=2, data_rank=0, data_size=2, seed=5)
    c.load_state_dict(b.state_dict())
    assert all(
        torch.equal(x, y)
        for x, y in zip(first[7:], [c.next_batch()["input_ids"] for _ in range(13)], strict=True)
    )
    other = RowLoader(rows, micro_batch_size=2, data_rank=0, data_size=2, seed=6)
    assert not torch.equal(first[0], other.next_batch()["input_ids"])
    # the two data ranks split each global batch: together they read every row once per epoch
    r1 = RowLoader(rows, micro_batch_size=2, data_rank=1, data_size=2, seed=5)
    seen = torch.cat(
        [torch.cat([x, r1.next_batch()["input_ids"]]) for x in first[: len(rows) // 4]]
    )
    assert len({tuple(r) for r in seen.tolist()}) == len(rows) // 4 * 4


def _section(**kw) -> DataSection:
    return DataSection(seq_len=16, val_fraction=0.0, **kw)


def test_jsonl_text_and_parquet_files(tmp_path) -> None:
    tok = byte_tokenizer()
    texts = ["first document", "second one", "third"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(texts) + "\n")
    import datasets

    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(pq))
    expected = sum(len(t.encode()) + 2 for t in texts)
    for section in (_section(path=str(jsonl), text_field="body"), _section(path=str(txt)),
                    _section(path=str(pq))):  # fmt: skip
        train, val = build_datasets(section, tok, seed=0)
        real = int((train.input_ids != 0).sum())
        assert real == expected and val is None, section
    with pytest.raises(RecipeError, match=r"data.text_field = 'text': not a column .* \['body'\]"):
        build_datasets(_section(path=str(jsonl)), tok, seed=0)
    with pytest.raises(RecipeError, match="data.path = .*no such file"):
        check_data_files(_section(path=str(tmp_path / "none.jsonl")))
    (tmp_path / "d.csv").write_text("a\n")
    with pytest.raises(RecipeError, match="data.format"):
        check_data_files(_section(path=str(tmp_path / "d.csv")))


def test_chat_messages_and_validation_split(tmp_path) -> None:
    tok = byte_tokenizer()
    chats = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]
             for i in range(20)]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    section = DataSection(path=str(path), messages_field="messages", seq_len=16, val_fraction=0.25)
    train, val = build_datasets(section, tok, seed=0)
    decoded = tok.decode(train.input_ids.flatten().tolist(), skip_special_tokens=True)
    assert "<|user|>\nhi" in decoded and "<|assistant|>\nhello" in decoded
    val_text = tok.decode(val.input_ids.flatten().tolist(), skip_special_tokens=True)
    assert val_text.count("<|user|>") == 5 and decoded.count("<|user|>") == 15
    held = {line for line in val_text.split("\n") if line.startswith("hi")}
    assert not held & {line for line in decoded.split("\n") if line.startswith("hi")}


def test_packed_rows_reach_the_model_as_separate_documents() -> None:
    """Logits of a packed row equal each document run alone (seq_idx reaches attention and Mamba)."""
    from am_automodel.models import model_spec, tiny_nemotron_h
    from am_dtype import BackendConfig

    config = tiny_nemotron_h(BYTE_VOCAB_SIZE)
    spec = model_spec(config)
    torch.manual_seed(0)
    model = spec.build(config, BackendConfig(attn="sdpa"))
    spec.init_weights(model, torch.float32)
    model.eval()
    docs = [[1, *range(40, 61), 2], [1, *range(70, 79), 2]]
    rows = pack_documents(docs, seq_len=34, pad_id=0)
    assert spec.packing == "seq_idx"
    with torch.no_grad():
        packed = model(input_ids=rows.input_ids, seq_idx=rows.seq_idx).logits[0]
        alone = [model(input_ids=torch.tensor([d])).logits[0] for d in docs]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # and without seq_idx the second document would see the first (the check can fail)
    with torch.no_grad():
        leaky = model(input_ids=rows.input_ids).logits[0]
    assert not torch.allclose(leaky[len(docs[0]) :], alone[1], atol=1e-3)


def test_one_document_per_row_when_not_packing() -> None:
    from am_automodel.data import rows_per_document

    rows = rows_per_document([[1, 10, 11, 2], [1, *range(20, 27), 2]], seq_len=5, pad_id=0)
    # the long document continues in a row of its own; every row is right-padded
    assert rows.input_ids.tolist() == [[1, 10, 11, 2, 0], [1, 20, 21, 22, 23], [24, 25, 26, 2, 0]]
    N = IGNORE_INDEX
    targets = next_token_targets(rows.labels, rows.seq_idx)
    assert targets.tolist() == [[10, 11, 2, N, N], [20, 21, 22, 23, N], [25, 26, 2, N, N]]
