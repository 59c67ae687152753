"""A tiny checkpointable model for the save/load tests: five Linear(16, 16) layers under a
Llama config (only the config file format matters), one layer per shard at SHARD_BYTES."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig

from am_utils.checkpointing import HFCheckpointingMixin

HIDDEN, LAYERS = 16, 5
SHARD_BYTES = 1100  # one Linear(16, 16) with bias (1088 bytes in fp32) per shard: 5 shards


class TinyNet(HFCheckpointingMixin, nn.Module):
    """Five Linear layers under a Llama config (only the config file format matters)."""

    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS))


def make_model(seed: int, initializer_range: float = 0.02) -> TinyNet:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=32,
        num_attention_heads=2,
        vocab_size=8,
        initializer_range=initializer_range,
    )
    return TinyNet(config)
