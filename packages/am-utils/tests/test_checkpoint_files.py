"""Corrupt or mismatched checkpoint files: every one is an error naming the file and what is
wrong (never a raw safetensors/JSON/KeyError, never a silent load)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny_checkpoint import SHARD_BYTES, TinyNet, make_model
from transformers import GPT2Config

from am_utils.checkpointing import CheckpointLoadError, read_hf_state_dict

INDEX = "model.safetensors.index.json"


@pytest.fixture
def sharded(tmp_path) -> Path:
    make_model(0).save_pretrained(tmp_path, max_shard_size=SHARD_BYTES)
    return tmp_path


@pytest.fixture
def single(tmp_path) -> Path:
    make_model(0).save_pretrained(tmp_path)
    return tmp_path


def test_truncated_shard_names_the_file(sharded):
    shard = sharded / "model-00002-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointLoadError, match=r"model-00002-of-00005\.safetensors.*truncated"):
        TinyNet.from_pretrained(sharded)


def test_empty_single_file_names_the_file(single):
    (single / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointLoadError, match=r"model\.safetensors \(0 bytes\)"):
        read_hf_state_dict(single)


def test_corrupt_index(sharded):
    (sharded / INDEX).write_text('{"weight_map": {"layers.0.weight": ')
    with pytest.raises(CheckpointLoadError, match=rf"{INDEX} is not valid JSON"):
        TinyNet.from_pretrained(sharded)


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": ["a"]}, [1, 2]])
def test_index_without_weight_map(sharded, index):
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointLoadError, match=rf"{INDEX} has no 'weight_map' object"):
        TinyNet.from_pretrained(sharded)


def test_index_naming_a_missing_shard_or_a_tensor_its_shard_lacks(sharded):
    index = json.loads((sharded / INDEX).read_text())
    (sharded / "model-00004-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointLoadError, match=r"lists shard 'model-00004-of-00005"):
        read_hf_state_dict(sharded)
    index["weight_map"]["layers.0.weight"] = "model-00005-of-00005.safetensors"
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "00004" not in v}
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointLoadError, match=r"does not hold: \['layers\.0\.weight'\]"):
        read_hf_state_dict(sharded)


def test_missing_config(single):
    (single / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist.*pass config="):
        TinyNet.from_pretrained(single)


def test_unparseable_config(single):
    (single / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CheckpointLoadError, match=r"config\.json is not valid JSON"):
        TinyNet.from_pretrained(single)


def test_config_of_another_model_type(single):
    GPT2Config(n_embd=16, n_layer=5, n_head=2).save_pretrained(single)
    with pytest.raises(
        CheckpointLoadError, match=r"config\.json describes a model of type \['gpt2'\].*'llama'"
    ):
        TinyNet.from_pretrained(single)
    with pytest.raises(CheckpointLoadError, match=r"model type 'gpt2'.*cannot build TinyNet"):
        TinyNet.from_pretrained(single, config=GPT2Config())
