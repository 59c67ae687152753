"""Multi-token prediction heads: math, losses, layout, pipeline-stage contract."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _nemotron_helpers import cpu_backend, rel_err, tiny_config

from am_models_nemotron import NemotronHForCausalLM

DEPTHS = 2


def _model(repeated=False, factor=0.1):
    torch.manual_seed(0)
    cfg = tiny_config(
        num_nextn_predict_layers=DEPTHS, mtp_layers_block_type=["full_attention", "moe"]
    )
    m = NemotronHForCausalLM(
        cfg, backend=cpu_backend(), mtp_loss_scaling_factor=factor, mtp_use_repeated_layer=repeated
    )
    m.initialize_weights(dtype=torch.float32)
    return m


def _ids(batch=2, seq=10, seed=3):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_output_fields_and_shapes():
    m = _model()
    out = m(_ids())
    assert len(out.mtp_per_depth_h) == DEPTHS
    assert all(h.shape == (2, 10, 32) for h in out.mtp_per_depth_h)
    assert out.mtp_loss_scaling_factor == pytest.approx(0.1)
    plain = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    assert plain.mtp is None and plain(_ids()).mtp_per_depth_h is None


def test_depth_zero_follows_the_documented_math():
    m = _model().eval()
    ids = _ids()
    with torch.no_grad():
        out = m(ids, output_hidden_states=True)
        (h_main,) = out.hidden_states
        shifted = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        e = m.model.embed_tokens(shifted)
        e[:, -1] = 0
        first, second = m.mtp.layers["0"], m.mtp.layers["1"]
        x = first.eh_proj(torch.cat([first.enorm(e), first.hnorm(h_main)], dim=-1))
        x = x + first.mixer(first.norm(x))  # attention block, causal
        x = x + second.mixer(second.norm(x))  # MoE block
        expected = second.final_layernorm(x)
    assert rel_err(out.mtp_per_depth_h[0], expected) <= 1e-5


def test_loss_is_main_plus_scaled_mean_of_depth_losses():
    m = _model(factor=0.3)
    ids = _ids()
    labels = ids.clone()
    labels[1, 4] = -100
    out = m(ids, labels=labels)
    logits = out.logits.float()
    main = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    depth_losses = []
    for d, h in enumerate(out.mtp_per_depth_h):
        lg = m.lm_head(h).float()[:, : 10 - d - 2]
        depth_losses.append(F.cross_entropy(lg.reshape(-1, 64), labels[:, d + 2 :].reshape(-1)))
    expected = main + 0.3 * (depth_losses[0] + depth_losses[1]) / 2
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    out.loss.backward()
    assert m.mtp.layers["2"].eh_proj.weight.grad.abs().sum() > 0  # depth 1 is trained too


def test_checkpoint_layout_and_repeated_layer():
    m, shared = _model(), _model(repeated=True)
    keys = set(m.state_dict_adapter.to_hf(m.state_dict()))
    for i in range(2 * DEPTHS):
        assert f"mtp.layers.{i}.norm.weight" in keys
    assert "mtp.layers.0.eh_proj.weight" in keys and "mtp.layers.2.enorm.weight" in keys
    assert "mtp.layers.3.final_layernorm.weight" in keys
    assert "mtp.layers.1.mixer.experts.3.up_proj.weight" in keys
    assert sorted(shared.mtp.layers) == ["0", "1"]
    out = shared(_ids())
    assert len(out.mtp_per_depth_h) == DEPTHS
    n_mtp = sum(p.numel() for p in m.mtp.parameters())
    assert sum(p.numel() for p in shared.mtp.parameters()) * DEPTHS == n_mtp


def test_save_and_reload_keeps_mtp(tmp_path):
    m = _model().eval()
    m.save_pretrained(tmp_path)
    again = NemotronHForCausalLM.from_pretrained(tmp_path, backend=cpu_backend())
    ids = _ids()
    with torch.no_grad():
        a, b = m(ids), again(ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.mtp_per_depth_h[1], b.mtp_per_depth_h[1])


def _split(m, cut):
    first, last = copy.deepcopy(m), copy.deepcopy(m)
    for name in [n for n in first.model.layers if int(n) >= cut]:
        del first.model.layers[name]
    first.model.norm = first.lm_head = first.mtp = None
    for name in [n for n in last.model.layers if int(n) < cut]:
        del last.model.layers[name]
    last.model.embed_tokens = None
    return first, last


def test_two_pipeline_stages_reproduce_the_full_model():
    m = _model().eval()
    names = m.customize_pipeline_stage_modules(
        [["model.embed_tokens", "model.layers.0", "mtp"], ["model.layers.1", "lm_head"]],
        "model.layers",
    )
    assert "mtp" not in names[0] and names[1][-1] == "mtp"
    first, last = _split(m, cut=3)
    assert first._is_pipeline_parallel_stage() and last._is_pipeline_parallel_stage()
    assert not m._is_pipeline_parallel_stage()
    ids = _ids()
    with torch.no_grad():
        full = m(ids)
        sent = first(ids)
        received = last(*sent)
    assert len(sent) == 1 + DEPTHS and len(received) == 1 + DEPTHS
    assert rel_err(received[0], full.logits) <= 1e-5
    for d in range(DEPTHS):
        assert rel_err(received[1 + d], m.lm_head(full.mtp_per_depth_h[d])) <= 1e-5
    in_meta, out_meta = first.get_pipeline_stage_metas(True, 2, 10, torch.float32)
    assert [t.shape for t in out_meta] == [t.shape for t in sent]
    assert in_meta[0].shape == (2, 10) and in_meta[0].dtype == torch.long
    in_meta, out_meta = last.get_pipeline_stage_metas(False, 2, 10, torch.float32)
    assert [t.shape for t in in_meta] == [t.shape for t in sent]
    assert [t.shape for t in out_meta] == [t.shape for t in received]
