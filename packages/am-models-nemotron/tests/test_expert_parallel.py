"""Expert parallelism over gloo: same loss and gradients as one process."""

from __future__ import annotations

import pytest
import torch
from _nemotron_ep_workers import ep_matches_single_process, ep_rank_with_empty_batch
from _nemotron_helpers import randomize_hf, tiny_config
from transformers import NemotronHForCausalLM as HFNemotronH

from am_dtype.testing import run_distributed


@pytest.mark.distributed
@pytest.mark.slow  # two spawned ranks each import torch + transformers (~1 min on 2 busy cores)
def test_ep2_loss_and_gradients_equal_single_process(tmp_path):
    torch.manual_seed(0)
    randomize_hf(HFNemotronH(tiny_config(latent=16))).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(9))
    results = run_distributed(ep_matches_single_process, 2, str(tmp_path), ids, timeout_s=180)
    for errors in results:
        assert errors["loss"] <= 1e-5
        assert len(errors) > 40  # every parameter was compared
        worst = max((v, k) for k, v in errors.items() if k != "loss")
        assert worst[0] <= 1e-4, worst


@pytest.mark.distributed
@pytest.mark.slow  # two spawned ranks import torch + transformers
def test_ep2_rank_with_an_empty_batch_takes_part_in_every_collective():
    """Rank 1 has a [0, S] batch; without its forward/backward all-to-alls rank 0 would hang."""
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    results = run_distributed(ep_rank_with_empty_batch, 2, ids, timeout_s=240)
    assert results[0].pop("logits_shape") == (1, 12, 64)
    assert results[1].pop("logits_shape") == (0, 12, 64)
    for errors in results:
        assert errors.pop("loss") <= 1e-6
        assert len(errors) > 40  # every parameter, MTP MoE included
        worst = max((v, k) for k, v in errors.items())
        assert worst[0] <= 1e-5, worst


@pytest.mark.distributed
@pytest.mark.slow
def test_parallelize_model_wraps_decoder_and_mtp_blocks_on_custom_axis_names():
    from _nemotron_ep_workers import parallelize_with_mtp_on_custom_axes

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    for r in run_distributed(parallelize_with_mtp_on_custom_axes, 2, ids, timeout_s=180):
        assert r["units"]["decoder"] == [(True, True)] * 6  # FSDP unit and checkpointed
        assert r["units"]["mtp"] == [(True, True)] * 4  # 2 depths x (attention, moe)
        assert r["loaded_local_experts"]
        errors = r["errors"]
        assert errors["loss"] <= 1e-5
        assert any(k.startswith("mtp.layers.") for k in errors)  # MTP params compared too
        worst = max((v, k) for k, v in errors.items() if k != "loss")
        assert worst[0] <= 1e-4, worst
