"""Two gloo processes equal one process: EP=2 + FSDP2 through am-moe's parallelizer (MoE),
FSDP2 with `cast_forward_inputs=True` on the K/V-sharing dense model, and CP=2 (load-balanced,
sequence 16 > sliding window 6) on both models, with one document per row and with 2-3 packed
documents per row (one longer than the window, edges inside the CP chunks)."""

from __future__ import annotations

import pytest
import torch
from _gemma4_dist_workers import all_cases
from _gemma4_helpers import (
    TEXT_VOCAB,
    gemma4_config,
    randomize_hf,
    tiny_kv_shared_text,
    tiny_moe_text,
)
from transformers import Gemma4ForConditionalGeneration as HFGemma4

from am_dtype.testing import run_distributed


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, TEXT_VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _check(errors: dict, min_params: int) -> None:
    assert errors["loss"] <= 1e-5, errors["loss"]
    assert len(errors) > min_params  # every parameter was compared
    worst = max((v, k) for k, v in errors.items() if k != "loss")
    assert worst[0] <= 1e-4, worst


@pytest.mark.distributed
@pytest.mark.slow  # one spawn of 2 ranks, each importing torch + transformers
def test_ep2_fsdp2_kv_sharing_fsdp2_and_cp2_equal_one_process(tmp_path):
    torch.manual_seed(0)
    moe, dense = tmp_path / "moe", tmp_path / "dense"
    randomize_hf(HFGemma4(gemma4_config(tiny_moe_text()))).save_pretrained(moe)
    randomize_hf(HFGemma4(gemma4_config(tiny_kv_shared_text()))).save_pretrained(dense)
    results = run_distributed(all_cases, 2, str(moe), str(dense), _ids(11), _ids(12), timeout_s=300)
    for result in results:
        _check(result["moe"], 80)
        _check(result["dense"], 50)
        for case in ("cp_moe", "cp_dense", "cp_packed_moe", "cp_packed_dense"):
            assert result[case].pop("logits") <= 1e-5, case
            _check(result[case], 50)
