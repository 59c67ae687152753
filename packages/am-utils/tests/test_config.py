"""am_utils.config: plain config objects and the generation config built from them."""

from __future__ import annotations

from types import SimpleNamespace

from transformers import GenerationConfig, LlamaConfig

from am_utils.config import config_attributes, generation_config_for, is_pretrained_config


class PlainConfig:
    vocab_size = 10  # a class attribute, as in a hand-written config class

    def __init__(self):
        self.hidden_size = 4

    @property
    def broken(self):
        raise AttributeError("cannot answer")

    def method(self):
        return 1


def test_config_attributes_of_plain_objects_and_pretrained_configs():
    assert config_attributes(PlainConfig()) == {"vocab_size": 10, "hidden_size": 4}
    assert config_attributes(SimpleNamespace(a=1, _private=2)) == {"a": 1}
    assert config_attributes(LlamaConfig(vocab_size=7))["vocab_size"] == 7
    assert is_pretrained_config(LlamaConfig()) and not is_pretrained_config(PlainConfig())


def test_generation_config_from_a_pretrained_config_a_plain_one_or_defaults():
    llama = generation_config_for(LlamaConfig(bos_token_id=3, eos_token_id=4))
    assert (llama.bos_token_id, llama.eos_token_id) == (3, 4)
    plain = generation_config_for(SimpleNamespace(eos_token_id=5, hidden_size=8))
    assert plain.eos_token_id == 5 and plain.bos_token_id is None
    default = GenerationConfig()
    bare = generation_config_for(SimpleNamespace(hidden_size=8))
    assert bare.eos_token_id is None and bare.max_length == default.max_length
    # Attributes that cannot form a generation config: transformers' defaults.
    bad = generation_config_for(SimpleNamespace(num_beams="many", temperature=object()))
    assert bad.num_beams == default.num_beams
