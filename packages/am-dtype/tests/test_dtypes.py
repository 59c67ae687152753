"""One table of dtype spellings (resolve_dtype) and a config's parameter dtype (config_dtype)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from am_dtype.dtypes import DTYPE_ALIASES, config_dtype, resolve_dtype


@pytest.mark.parametrize(
    "spelling,want",
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        (" BF16 ", torch.bfloat16),
        ("fp32", torch.float32),
        ("float", torch.float32),
        ("half", torch.float16),
        ("double", torch.float64),
        (torch.float16, torch.float16),
        (None, None),
    ],
)
def test_every_spelling_resolves(spelling, want):
    assert resolve_dtype(spelling) is want


def test_unknown_or_integer_dtypes_are_rejected_naming_the_argument():
    with pytest.raises(ValueError, match=r"from_pretrained dtype='bf17'.*'bf16'"):
        resolve_dtype("bf17", name="from_pretrained dtype")
    with pytest.raises(ValueError, match="torch.int64 is not a floating-point dtype"):
        resolve_dtype(torch.int64)
    with pytest.raises(ValueError, match="not a known floating dtype"):
        resolve_dtype(16)


def test_aliases_are_all_floating():
    assert all(d.is_floating_point for d in DTYPE_ALIASES.values())


def test_config_dtype_reads_dtype_then_torch_dtype_then_default():
    assert config_dtype(SimpleNamespace(dtype="bf16")) is torch.bfloat16
    assert config_dtype(SimpleNamespace(torch_dtype="float32")) is torch.float32
    assert config_dtype(SimpleNamespace()) is torch.bfloat16
    assert config_dtype(SimpleNamespace(dtype=None), default=torch.float32) is torch.float32
    # `dtype` present (even None) wins: transformers 5 warns on reading torch_dtype.
    assert config_dtype(SimpleNamespace(dtype=None, torch_dtype="fp16")) is torch.bfloat16
    with pytest.raises(ValueError, match="config.dtype='int8'"):
        config_dtype(SimpleNamespace(dtype="int8"))


def test_config_dtype_of_a_composite_config_falls_back_to_its_text_config():
    # transformers' vision-language configs (Gemma4Config) answer get_text_config().
    text_config = SimpleNamespace(dtype="float32")
    config = SimpleNamespace(dtype=None, get_text_config=lambda: text_config)
    assert config_dtype(config) is torch.float32  # the text config's
    config.dtype = "bfloat16"
    assert config_dtype(config) is torch.bfloat16  # the top level wins when set
    text = SimpleNamespace(dtype=None)
    text.get_text_config = lambda: text  # a text config is its own text config
    assert config_dtype(text, default=torch.float16) is torch.float16
