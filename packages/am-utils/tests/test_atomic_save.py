"""save_pretrained is atomic: an exception or a SIGKILL part-way leaves the previous checkpoint
loadable and byte-for-byte unchanged, the next save works, and files the save did not
replace survive. Tiny 5-layer model, one layer per shard (5 shards).

The SIGKILL tests fork the test process (no fresh interpreter to import torch into, so each
takes well under a second): the child starts a save and blocks at a chosen point (inside
the shard writer, or just before a rename of the roll forward), tells the parent through a
pipe, and the parent kills it with SIGKILL there."""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from _tiny_checkpoint import SHARD_BYTES, TinyNet, make_model
from transformers import LlamaConfig, LlamaForCausalLM

import am_utils.checkpoint_files as checkpoint_files
from am_utils.checkpointing import HFCheckpointingMixin, read_hf_state_dict

STAGE = re.compile(r"^\.am-save-[0-9a-f]{12}$")  # our staging directories
FOREIGN = {
    "README.md": b"# my model card\n",
    "pytorch_model.bin": b"not ours: an older pickle checkpoint",
    "consolidated-00001-of-00002.safetensors": b"a shard of another naming",
    "model-00007-of-00009.safetensors": b"a standard-looking shard no index lists",
}


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (recursively) with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def saved_checkpoint(directory: Path, seed: int = 0) -> tuple[TinyNet, dict[str, bytes]]:
    """A sharded checkpoint of a seeded model plus foreign files; returns model and snapshot."""
    model = make_model(seed)
    model.save_pretrained(directory, max_shard_size=SHARD_BYTES)
    for name, data in FOREIGN.items():
        (directory / name).write_bytes(data)
    return model, snapshot(directory)


def assert_loads_as(directory: Path, model: TinyNet) -> None:
    loaded = TinyNet.from_pretrained(directory)
    assert loaded.config.initializer_range == model.config.initializer_range
    expected = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def assert_clean_new_save(directory: Path, seed: int) -> None:
    """A further save works, loads exactly, leaves no staging dir and keeps foreign files."""
    new = make_model(seed)
    new.save_pretrained(directory, max_shard_size=SHARD_BYTES)
    assert_loads_as(directory, new)
    assert not [p for p in directory.iterdir() if STAGE.match(p.name)]
    for name, data in FOREIGN.items():
        assert (directory / name).read_bytes() == data, name
    index = (directory / "model.safetensors.index.json").read_text()
    shards = {p.name for p in directory.glob("model*.safetensors")} - set(FOREIGN)
    assert len(shards) == 5 and all(name in index for name in shards)


def _fail_on_call(k: int, monkeypatch) -> None:
    real = checkpoint_files.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == k:
            Path(filename).write_bytes(b"\0" * 100)  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_files, "save_file", save_file)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_exception_on_shard_k_leaves_previous_checkpoint(tmp_path, monkeypatch, k):
    old, before = saved_checkpoint(tmp_path)
    _fail_on_call(k, monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        make_model(1, initializer_range=0.05).save_pretrained(tmp_path, max_shard_size=SHARD_BYTES)
    assert snapshot(tmp_path) == before  # nothing changed, nothing left behind
    assert_loads_as(tmp_path, old)
    monkeypatch.undo()
    assert_clean_new_save(tmp_path, seed=2)


def test_exception_in_single_file_save_keeps_previous(tmp_path, monkeypatch):
    old = make_model(0)
    old.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    _fail_on_call(1, monkeypatch)
    with pytest.raises(OSError):
        make_model(1, initializer_range=0.05).save_pretrained(tmp_path)
    assert snapshot(tmp_path) == before
    assert_loads_as(tmp_path, old)


def _block_forever(ready_fd: int) -> None:
    os.write(ready_fd, b"R")
    while True:
        time.sleep(1)


def _stop_at_shard(k: int, ready_fd: int) -> None:
    real = checkpoint_files.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == k:
            Path(filename).write_bytes(os.urandom(500))  # half a shard, as a kill leaves it
            _block_forever(ready_fd)
        return real(tensors, filename, metadata=metadata)

    checkpoint_files.save_file = save_file


def _stop_before_rename_to(target: str, ready_fd: int) -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == target:
            _block_forever(ready_fd)
        return real(src, dst, *args, **kwargs)

    os.replace = replace  # in the forked child only


def _kill_mid_save(directory: Path, stop) -> None:
    """Fork; the child saves model seed 1 and blocks where ``stop`` puts it; SIGKILL it."""
    read_fd, ready_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_fd)
            stop(ready_fd)
            make_model(1, initializer_range=0.05).save_pretrained(
                directory, max_shard_size=SHARD_BYTES
            )
            os.write(ready_fd, b"F")  # finished: the kill point was never reached
        finally:
            os._exit(0)
    os.close(ready_fd)
    try:
        assert os.read(read_fd, 1) == b"R", "the save finished before the kill point"
        os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


@posix_only
def test_sigkill_while_writing_shard_3_leaves_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    old, before = saved_checkpoint(directory)
    _kill_mid_save(directory, lambda fd: _stop_at_shard(3, fd))
    after = snapshot(directory)
    leftovers = {name for name in after if name not in before}
    assert {name for name in before if after.get(name) != before[name]} == set()
    assert leftovers and all(STAGE.match(name.split("/")[0]) for name in leftovers)
    assert read_hf_state_dict(directory).keys() == {
        f"layers.{i}.{p}" for i in range(5) for p in ("weight", "bias")
    }
    assert_loads_as(directory, old)  # the half-written staged shard is never looked at
    assert_clean_new_save(directory, seed=2)


@posix_only
def test_sigkill_after_commit_loads_new_checkpoint_and_next_save_finishes(tmp_path):
    directory = tmp_path / "ckpt"
    saved_checkpoint(directory)
    # Killed after the commit, as the new index is about to replace the old one: the new
    # shards are in place, the old index and config still are too.
    index = "model.safetensors.index.json"
    _kill_mid_save(directory, lambda fd: _stop_before_rename_to(index, fd))
    assert [p.name for p in directory.iterdir() if STAGE.match(p.name)]
    assert_loads_as(directory, make_model(1, initializer_range=0.05))
    assert_clean_new_save(directory, seed=2)


def test_foreign_files_survive_and_switching_layouts_leaves_one_entry(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )

    class MixinLlama(HFCheckpointingMixin, LlamaForCausalLM):
        pass

    model = MixinLlama(config)
    model.save_pretrained(tmp_path)  # single file
    for name, data in FOREIGN.items():
        (tmp_path / name).write_bytes(data)
    model.save_pretrained(tmp_path, max_shard_size="10KB")  # single -> sharded
    # transformers prefers model.safetensors over the index: the old one must be gone.
    assert not (tmp_path / "model.safetensors").exists()
    reference = LlamaForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reference.state_dict()[name], tensor), name
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path)  # sharded -> single
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*FOREIGN, "config.json", "generation_config.json", "model.safetensors"]
    )
    for name, data in FOREIGN.items():
        assert (tmp_path / name).read_bytes() == data, name
    assert torch.equal(
        LlamaForCausalLM.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight
    )


def test_unsafe_save_refuses_to_be_shadowed_by_safetensors(tmp_path):
    model = make_model(0)
    model.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="loaders prefer over pytorch_model"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert snapshot(tmp_path) == before


def test_uncommitted_leftovers_ignored_by_loads_and_removed_by_next_save(tmp_path):
    old, _ = saved_checkpoint(tmp_path)
    stale = tmp_path / ".am-save-0123456789ab"
    stale.mkdir()
    (stale / "config.json").write_text("{ truncated")
    (stale / "model.safetensors.index.json").write_text("{}")
    not_ours = tmp_path / ".am-save-notours"
    not_ours.mkdir()
    assert_loads_as(tmp_path, old)
    assert_clean_new_save(tmp_path, seed=3)
    assert not stale.exists() and not_ours.is_dir()
