"""Expert parallelism over gloo: same loss and gradients as one process."""

from __future__ import annotations

import pytest
import torch
from _nemotron_ep_workers import ep_matches_single_process
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
