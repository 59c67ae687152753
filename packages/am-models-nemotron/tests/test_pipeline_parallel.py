"""Pipeline parallelism over gloo: 2 stages on torch.distributed.pipelining, MTP on the last.

Both ranks build the same tiny model (Mamba, MoE, attention and MLP blocks, 2 MTP depths),
split it with the model's hooks (`customize_pipeline_stage_modules` pins `mtp` to the last
stage; `get_pipeline_stage_metas` gives PipelineStage its static input/output tensors) and run
one Schedule1F1B step (4 microbatches) whose loss_fn is the model's documented loss. The
losses and every parameter's gradient on each stage must equal those of the unsplit model run
in one process on the same microbatches.
"""

from __future__ import annotations

import pytest
import torch
from _nemotron_pp_workers import pp_matches_single_process, tiny_mtp_model

from am_dtype.testing import run_distributed

N_MICROBATCHES = 4


@pytest.mark.distributed
@pytest.mark.slow  # two spawned ranks each import torch + transformers (~5-10 s)
def test_two_stage_pipeline_losses_and_gradients_equal_single_process():
    ids = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, 4] = -100  # ignored targets are honoured by the stage's loss_fn too
    first, last = run_distributed(
        pp_matches_single_process, 2, ids, labels, N_MICROBATCHES, timeout_s=240
    )
    assert first["weights_checksum"] == last["weights_checksum"]  # same seed, same model

    # The schedule runs with scale_grads=False, so its gradients are those of the sum of the
    # per-microbatch losses; the reference backpropagates the same sum (see the worker).
    # Losses are compared microbatch by microbatch, so nothing depends on the reduction.
    assert len(last["losses"]) == N_MICROBATCHES
    for got, ref in zip(last["losses"], last["ref_losses"], strict=True):
        assert abs(got - ref) <= 1e-5 * abs(ref), (got, ref)

    # Each parameter lives on exactly one stage, and every one of them is compared.
    names = {n for n, _ in tiny_mtp_model().named_parameters()}
    on_first, on_last = set(first["grad_errors"]), set(last["grad_errors"])
    assert on_first.isdisjoint(on_last) and on_first | on_last == names
    assert "model.embed_tokens.weight" in on_first
    assert {"lm_head.weight", "model.norm.weight", "mtp.layers.0.eh_proj.weight"} <= on_last
    assert any(n.startswith("mtp.layers.3.") for n in on_last)  # depth 1's MoE sub-layer
    for result in (first, last):
        assert result["nonzero_ref_grads"] >= 0.9 * len(result["grad_errors"])
        worst = max((err, name) for name, err in result["grad_errors"].items())
        assert worst[0] <= 1e-4, worst

    # embed_tokens' gradient includes the MTP path (its shifted embeddings travel to the last
    # stage as extra outputs): without that path it would be off by far more than 1e-4.
    assert first["embed_err_without_mtp_path"] > 1e-2
