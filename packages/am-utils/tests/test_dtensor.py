"""DTensor paths (LM-head weight, checkpoint gathering, parameter stats) on a one-process
gloo group created in this process; the group is destroyed afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from transformers import LlamaConfig, LlamaForCausalLM

from am_utils import HFCheckpointingMixin, count_model_parameters, get_lm_head_weight
from am_utils.params import _get_model_param_stats


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "filestore"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _shard_all_parameters(model: nn.Module, mesh) -> None:
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.detach(), mesh, [Shard(0)])
            module.register_parameter(
                name, nn.Parameter(sharded, requires_grad=param.requires_grad)
            )


class MixinLlama(HFCheckpointingMixin, LlamaForCausalLM):
    pass


def _tiny_llama():
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return MixinLlama(config).eval()


def test_lm_head_weight_of_dtensor_is_gathered(mesh):
    head = nn.Linear(8, 6, bias=False)
    reference = head.weight.detach().clone()
    head.weight = nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
    model = nn.Module()
    model.lm_head = head
    assert isinstance(model.lm_head.weight, DTensor)
    weight = get_lm_head_weight(model)
    assert not isinstance(weight, DTensor)
    assert torch.equal(weight, reference)


def test_save_pretrained_gathers_dtensors(mesh, tmp_path):
    model = _tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    _shard_all_parameters(model, mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_param_stats_on_dtensors(mesh):
    model = _tiny_llama()
    plain_total, plain_trainable, plain_sq = _get_model_param_stats(model)
    _shard_all_parameters(model, mesh)
    trainable, total = count_model_parameters(model)
    assert (trainable, total) == (plain_trainable, plain_total)
    total_d, trainable_d, sq = _get_model_param_stats(model)
    assert (total_d, trainable_d) == (plain_total, plain_trainable)
    assert sq == pytest.approx(plain_sq, rel=1e-6)
