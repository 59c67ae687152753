"""MoE parity with transformers' Gemma4ForConditionalGeneration: checkpoints both ways,
logits, loss, every gradient, padding, greedy generation."""

from __future__ import annotations

import pytest
import torch
from _gemma4_helpers import (
    TEXT_VOCAB,
    VOCAB,
    cpu_backend,
    gemma4_config,
    randomize_hf,
    rel_err,
    tiny_moe_text,
)
from transformers import Gemma4ForConditionalGeneration as HFGemma4

from am_models_gemma4 import Gemma4ForConditionalGeneration, Gemma4MoE
from am_moe.layers import MoE

TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A transformers MoE model (fp32, random router / per-expert scales and norms, tied
    embeddings) and the directory its save_pretrained wrote."""
    torch.manual_seed(0)
    hf = randomize_hf(HFGemma4(gemma4_config(tiny_moe_text()))).eval()
    path = tmp_path_factory.mktemp("hf_gemma4_moe")
    hf.save_pretrained(path)
    return hf, path


def _batch(seed=1, batch=2, seq=15):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TEXT_VOCAB, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def test_logits_loss_and_every_gradient_match(saved):
    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    assert all(isinstance(layer.moe, MoE | Gemma4MoE) for layer in ours.model.layers)
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    ids, labels = _batch()
    ref = hf(ids, labels=labels)
    out = ours(ids, labels=labels)
    assert out.logits.shape == ref.logits.shape == (2, 15, VOCAB)
    assert rel_err(out.logits, ref.logits) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL * ref.loss.item()

    hf.zero_grad()
    ref.loss.backward()
    out.loss.backward()
    mapped = ours.state_dict_adapter.from_hf({n: p.grad for n, p in hf.named_parameters()})
    params = dict(ours.named_parameters())
    assert set(mapped) == set(params), set(mapped) ^ set(params)
    for name, param in params.items():
        assert param.grad is not None, name
        assert rel_err(param.grad, mapped[name]) <= 1e-4, name


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_recomputes_the_moe_layers_with_equal_gradients(saved):
    _, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend()).train()
    ids, labels = _batch(seed=7)
    ours(ids, labels=labels, use_cache=False).loss.backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.gradient_checkpointing_enable({"use_reentrant": False})
    calls = []
    hook = ours.model.layers[1].moe.register_forward_hook(lambda *_: calls.append(1))
    ours(ids, labels=labels, use_cache=False).loss.backward()
    hook.remove()
    assert len(calls) == 2  # forward, then the recompute during backward
    for name, param in ours.named_parameters():
        assert rel_err(param.grad, plain[name]) <= 1e-5, name


def test_missing_and_misshaped_keys_are_named(saved, tmp_path):
    hf, path = saved
    from safetensors.torch import load_file, save_file

    from am_utils.checkpointing import CheckpointLoadError

    weights = load_file(path / "model.safetensors")
    del weights["model.language_model.layers.2.router.per_expert_scale"]
    weights["model.language_model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 32)
    hf.config.save_pretrained(tmp_path)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointLoadError) as err:
        Gemma4ForConditionalGeneration.from_pretrained(tmp_path, backend=cpu_backend())
    message = str(err.value)
    assert "model.language_model.layers.2.moe.gate.per_expert_scale" in message
    assert "model.language_model.layers.0.mlp.up_proj.weight" in message


def _per_expert(weights: dict, layer: int) -> dict:
    """`weights` with layer `layer`'s stacked experts written one tensor per expert."""
    out = dict(weights)
    prefix = f"model.language_model.layers.{layer}.experts."
    for e, w in enumerate(out.pop(prefix + "gate_up_proj")):
        gate, up = w.chunk(2)
        out[f"{prefix}{e}.gate_proj.weight"] = gate.clone()
        out[f"{prefix}{e}.up_proj.weight"] = up.clone()
    for e, w in enumerate(out.pop(prefix + "down_proj")):
        out[f"{prefix}{e}.down_proj.weight"] = w.clone()
    return out


def _broken_checkpoint(hf, path, directory):
    """A checkpoint with one of each problem: a missing router key, a mis-shaped MLP weight,
    an unknown key, and a missing per-expert tensor in layer 1."""
    from safetensors.torch import load_file, save_file

    weights = _per_expert(load_file(path / "model.safetensors"), layer=1)
    del weights["model.language_model.layers.2.router.per_expert_scale"]
    del weights["model.language_model.layers.1.experts.3.down_proj.weight"]
    weights["model.language_model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 32)
    weights["model.language_model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
    hf.config.save_pretrained(directory)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return weights


def test_strict_names_every_bad_key_as_the_checkpoint_spells_it(saved, tmp_path):
    hf, path = saved
    from am_utils.checkpointing import CheckpointLoadError

    _broken_checkpoint(hf, path, tmp_path)
    with pytest.raises(CheckpointLoadError) as err:
        Gemma4ForConditionalGeneration.from_pretrained(tmp_path, backend=cpu_backend())
    # the checkpoint's key, not our renamed `...layers.1.moe.experts.3...`
    assert "model.language_model.layers.1.experts.3.down_proj.weight" in str(err.value)


def test_strict_false_loads_what_matches_and_reports_the_rest(saved, tmp_path, caplog):
    import logging

    hf, path = saved
    weights = _broken_checkpoint(hf, path, tmp_path)
    with caplog.at_level(logging.WARNING):
        ours = Gemma4ForConditionalGeneration.from_pretrained(
            tmp_path, backend=cpu_backend(), strict=False
        )
    report = caplog.text
    for key in (
        "model.language_model.layers.1.experts.3.down_proj.weight",  # the expert block
        "model.language_model.layers.2.moe.gate.per_expert_scale",  # missing
        "model.language_model.layers.0.mlp.up_proj.weight",  # mis-shaped
        "model.language_model.layers.0.self_attn.bogus.weight",  # unexpected
    ):
        assert key in report, key
    state = ours.state_dict()
    assert not any(t.is_meta for t in state.values())
    reference = hf.state_dict()
    skipped = {
        "model.language_model.layers.2.moe.gate.per_expert_scale",
        "model.language_model.layers.0.mlp.up_proj.weight",
        "model.language_model.layers.1.moe.experts.gate_and_up_projs",
        "model.language_model.layers.1.moe.experts.down_projs",
    }
    native = ours.state_dict_adapter.from_hf(reference)
    for key, value in state.items():
        if key in skipped:
            assert not torch.equal(value, native[key]), key  # initialized afresh
            assert torch.isfinite(value).all(), key
        else:
            assert torch.equal(value, native[key]), key
    assert "model.language_model.layers.0.self_attn.bogus.weight" in weights
    with torch.no_grad():
        assert torch.isfinite(ours(_batch()[0]).logits).all()


def test_reads_transformers_in_memory_and_per_expert_layouts(saved, tmp_path):
    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    reference = ours.state_dict()
    native = ours.state_dict_adapter.from_hf(hf.state_dict())
    assert set(native) == set(reference)
    for key, value in native.items():
        assert torch.equal(value, reference[key]), key
    # Per-expert on-disk layout (experts.{e}.{gate,up,down}_proj.weight).
    per_expert = {}
    for key, value in hf.state_dict().items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e, w in enumerate(value):
                gate, up = w.chunk(2)
                per_expert[f"{prefix}{e}.gate_proj.weight"] = gate
                per_expert[f"{prefix}{e}.up_proj.weight"] = up
        elif key.endswith("experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e, w in enumerate(value):
                per_expert[f"{prefix}{e}.down_proj.weight"] = w
        else:
            per_expert[key] = value
    again = ours.state_dict_adapter.from_hf(per_expert)
    for key, value in native.items():
        assert torch.equal(again[key], value), key


def test_our_checkpoint_loads_back_into_transformers(saved, tmp_path):
    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    ours.save_pretrained(tmp_path)
    from am_utils.checkpointing import read_hf_state_dict

    written = read_hf_state_dict(tmp_path)
    assert "lm_head.weight" not in written  # the tied head is written once (as the embedding)
    assert set(written) == set(read_hf_state_dict(path))
    reloaded, info = HFGemma4.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    original = HFGemma4.from_pretrained(path).eval()
    mine, theirs = reloaded.state_dict(), original.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    ids, _ = _batch(seed=2)
    with torch.no_grad():
        # transformers loading our files and its own files: bit-identical logits
        assert torch.equal(reloaded.eval()(ids).logits, original(ids).logits)
        assert rel_err(ours(ids).logits, hf(ids).logits) <= TOL


def test_sharded_checkpoint_and_logits_to_keep_and_hidden_states(saved, tmp_path):
    hf, _ = saved
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Gemma4ForConditionalGeneration.from_pretrained(tmp_path, backend=cpu_backend())
    ids, _ = _batch(seed=3)
    with torch.no_grad():
        ref = hf(ids, logits_to_keep=3, output_hidden_states=True)
        out = ours(ids, logits_to_keep=3, output_hidden_states=True)
    assert out.logits.shape == (2, 3, VOCAB)
    assert rel_err(out.logits, ref.logits) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    for mine, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert rel_err(mine, theirs) <= TOL


def test_padded_batch_matches_transformers(saved):
    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    ids, _ = _batch(seed=4, seq=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    assert rel_err(out[0], ref[0]) <= TOL
    assert rel_err(out[1, 4:], ref[1, 4:]) <= TOL


def test_greedy_generate_16_tokens_equals_transformers(saved):
    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    prompt, _ = _batch(seed=5, seq=5)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=16, do_sample=False)
        got = ours.generate(prompt, max_new_tokens=16, do_sample=False)
    assert got.shape == (2, 21)  # past the sliding window of 6
    assert torch.equal(got, expected)


def test_sampled_generate_runs_with_a_cache(saved):
    _, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    prompt, _ = _batch(seed=6, seq=4)
    torch.manual_seed(0)
    with torch.no_grad():
        out = ours.generate(prompt, max_new_tokens=6, do_sample=True, top_k=5)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)


def test_long_padded_batch_runs_chunked_attention_and_matches_transformers(saved, monkeypatch):
    """Sequences over two attention chunks: the sliding layers (and the full layers, which
    get a mask with padding) attend per query chunk; logits and every gradient still
    equal transformers' one whole-mask call."""
    import am_models_gemma4.windowed as windowed

    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    calls = []
    ranges = windowed.key_ranges
    monkeypatch.setattr(
        windowed, "key_ranges", lambda m, c: calls.append(ranges(m, c)) or calls[-1]
    )
    ids, labels = _batch(seed=5, seq=2 * windowed.CHUNK + 40)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    # Padded positions differ from transformers by design (ours keep them out of the
    # experts), so none may carry a target; position 8 would predict the first real label.
    labels[1, :10] = -100
    ref = hf(ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    assert calls and all(r is not None for r in calls)
    assert rel_err(out.logits[0], ref.logits[0]) <= TOL
    assert rel_err(out.logits[1, 9:], ref.logits[1, 9:]) <= TOL
    hf.zero_grad()
    ref.loss.backward()
    out.loss.backward()
    mapped = ours.state_dict_adapter.from_hf({n: p.grad for n, p in hf.named_parameters()})
    for name, param in ours.named_parameters():
        assert rel_err(param.grad, mapped[name]) <= 1e-4, name
