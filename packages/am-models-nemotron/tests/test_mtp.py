"""Multi-token prediction heads: math, losses, layout, pipeline-stage contract."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _nemotron_helpers import cpu_backend, rel_err, tiny_config

from am_models_nemotron import BlockInputs, NemotronHForCausalLM
from am_models_nemotron.mtp import mtp_embed_inputs
from am_utils.loss import causal_lm_loss

DEPTHS = 2
HYBRID_MTP = ["linear_attention", "full_attention", "moe"]  # Mamba, attention and MoE heads


def _model(repeated=False, factor=0.1, mtp_pattern=("full_attention", "moe")):
    torch.manual_seed(0)
    cfg = tiny_config(num_nextn_predict_layers=DEPTHS, mtp_layers_block_type=list(mtp_pattern))
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
        h_main = out.hidden_states[-1]  # the final-normed decoder output
        shifted = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # tail: token 0
        e = m.model.embed_tokens(shifted)
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


# ---------------------------------------------------------------- packed (THD) and padded batches
LENGTHS = (7, 12, 5)  # 12 > chunk_size: a boundary falls inside a Mamba chunk


def _depth_loss(m, h_d, labels, depth):
    """Mean CE of one depth for one unpacked sequence, and its number of targets."""
    n = labels.shape[-1] - depth - 2
    logits = m.lm_head(h_d).float()[0, :n]
    return F.cross_entropy(logits, labels[0, depth + 2 :]), n


def _weighted_alone_loss(m, seqs, outs, factor):
    """The packed loss rebuilt from the sequences run alone.

    Each loss is a mean over its valid targets, so the packed main loss is the
    (n_i - 1)-weighted mean of the per-sequence ones (each sequence's first label is -100
    in the packed labels) and the packed depth-d loss the (n_i - d - 2)-weighted mean.
    """
    main = [causal_lm_loss(o.logits, s) for s, o in zip(seqs, outs, strict=True)]
    n_main = [s.shape[1] - 1 for s in seqs]
    total_main = sum(w * loss for w, loss in zip(n_main, main, strict=True)) / sum(n_main)
    depth_terms = []
    for d in range(DEPTHS):
        parts = [
            _depth_loss(m, o.mtp_per_depth_h[d], s, d) for s, o in zip(seqs, outs, strict=True)
        ]
        depth_terms.append(sum(n * loss for loss, n in parts) / sum(n for _, n in parts))
    return total_main, factor * torch.stack(depth_terms).mean()


@pytest.mark.parametrize("how", ["cu_seqlens", "seq_idx", "squeezed_thd"])
def test_packed_batch_with_mtp_equals_each_sequence_alone(how):
    m = _model(factor=0.3, mtp_pattern=HYBRID_MTP)
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 64, (1, n), generator=gen) for n in LENGTHS]
    packed = torch.cat(seqs, dim=1)
    labels = packed.clone()
    starts = torch.tensor(LENGTHS).cumsum(0)[:-1]
    labels[0, starts] = -100  # the main loss never predicts the next sequence's first token
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    if how == "seq_idx":
        kwargs = {"seq_idx": torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None]}
    else:
        kwargs = {"cu_seqlens": cu}
    squeeze = how == "squeezed_thd"
    out = m(packed[0] if squeeze else packed, labels=labels[0] if squeeze else labels, **kwargs)
    logits, per_depth = out.logits, out.mtp_per_depth_h
    if squeeze:
        logits, per_depth = logits[None], [h[None] for h in per_depth]
    alone = [m(s, labels=s) for s in seqs]

    for i, part in enumerate(logits.split(LENGTHS, dim=1)):
        assert rel_err(part, alone[i].logits) <= 1e-4
    for d in range(DEPTHS):
        for i, part in enumerate(per_depth[d].split(LENGTHS, dim=1)):
            assert rel_err(part, alone[i].mtp_per_depth_h[d]) <= 1e-4, (d, i)

    main, mtp = _weighted_alone_loss(m, seqs, alone, factor=0.3)
    packed_main = causal_lm_loss(logits, labels)
    assert torch.allclose(packed_main, main, rtol=1e-5)
    assert torch.allclose(out.loss - packed_main, mtp, rtol=1e-4)

    # Gradients: the packed loss is that fixed-weight combination of the separate losses.
    m.zero_grad()
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    main, mtp = _weighted_alone_loss(m, seqs, [m(s, labels=s) for s in seqs], factor=0.3)
    (main + mtp).backward()
    for name, param in m.named_parameters():
        if param.grad is not None or name in packed_grads:
            ref = param.grad if param.grad is not None else torch.zeros_like(param)
            assert rel_err(packed_grads.get(name, torch.zeros_like(param)), ref) <= 1e-4, name
    assert packed_grads["mtp.layers.3.mixer.in_proj.weight"].abs().sum() > 0  # depth 1 Mamba


def test_mtp_targets_and_shifted_embeddings_never_cross_a_packed_boundary():
    m = _model()
    ids = _ids(batch=1, seq=10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)  # sequences at positions 0-3 and 4-9
    out = m(ids, labels=ids, cu_seqlens=cu)
    # t predicts t + d + 2 only inside its own sequence: t = 2, 3 (depth 0) and 1, 2, 3
    # (depth 1) would predict tokens of the second sequence and are left out.
    keep = {0: [0, 1, 4, 5, 6, 7], 1: [0, 4, 5, 6]}
    depth_losses = []
    for d, h in enumerate(out.mtp_per_depth_h):
        t = torch.tensor(keep[d])
        logits = m.lm_head(h)[0, t].float()
        depth_losses.append(F.cross_entropy(logits, ids[0, t + d + 2]))
    # The main loss drops t = 3's target too: it is the second sequence's first token.
    main = causal_lm_loss(out.logits, ids, torch.tensor([[0] * 4 + [1] * 6]))
    expected = main + 0.1 * torch.stack(depth_losses).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-5)

    seq_idx = torch.tensor([[0] * 4 + [1] * 6])
    embeds = mtp_embed_inputs(m.model.embed_tokens, ids, DEPTHS, BlockInputs(seq_idx=seq_idx))
    table = m.model.embed_tokens.weight
    assert torch.equal(embeds[0][0, 2], table[ids[0, 3]])  # e_0 at t: token t + 1
    assert torch.equal(embeds[0][0, 3], table[0])  # t + 1 is in the next sequence: token 0
    assert torch.equal(embeds[1][0, 2:4], table[[0, 0]])
    assert torch.equal(embeds[1][0, 6], table[ids[0, 8]])


@pytest.mark.parametrize("mask", ["attention_mask", "padding_mask"])
def test_right_padded_batch_with_mtp_equals_each_row_alone(mask):
    m = _model(factor=0.3, mtp_pattern=HYBRID_MTP).eval()
    lengths = (9, 6)
    ids = _ids(batch=2, seq=9, seed=5)
    real = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~real, 0)  # labels are not -100 at padding: the mask alone must rule
    kwargs = (
        {"attention_mask": real.long()} if mask == "attention_mask" else {"padding_mask": ~real}
    )
    with torch.no_grad():
        out = m(ids, labels=ids, **kwargs)
        rows = [ids[i : i + 1, :n] for i, n in enumerate(lengths)]
        alone = [m(r, labels=r) for r in rows]
    for i, n in enumerate(lengths):
        assert rel_err(out.logits[i : i + 1, :n], alone[i].logits) <= 1e-4
        for d in range(DEPTHS):
            assert (
                rel_err(out.mtp_per_depth_h[d][i : i + 1, :n], alone[i].mtp_per_depth_h[d]) <= 1e-4
            )
    _, mtp = _weighted_alone_loss(m, rows, alone, factor=0.3)
    with torch.no_grad():
        assert torch.allclose(out.loss - causal_lm_loss(out.logits, ids), mtp, rtol=1e-4)
