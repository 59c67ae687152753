"""Stage module lists, stage copies, schedule names, and bad input, all in one process.

Errors must come before any process-group work: these tests run without one (except the
last two, which use a one-rank gloo world to reach `PipelinedModel.step`).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _pp_models import CASES, llama, mistral3
from torch import nn

from am_pp import SCHEDULES, get_schedule_spec, pipeline_model, stage_indices_for_rank
from am_pp.split import generate_stage_module_names, materialize_stage, split_model_into_stages


def test_llama_names_embeddings_first_norm_and_head_last_layers_balanced():
    names = generate_stage_module_names(llama(), 2)
    assert names == [
        ["model.embed_tokens", "model.layers.0", "model.layers.1"],
        ["model.layers.2", "model.layers.3", "model.norm", "lm_head"],
    ]
    three = generate_stage_module_names(llama(num_hidden_layers=5), 3)
    assert [sum(n.startswith("model.layers.") for n in s) for s in three] == [2, 2, 1]
    explicit = generate_stage_module_names(llama(), 2, layers_per_stage=[3, 1])
    assert explicit[1] == ["model.layers.3", "model.norm", "lm_head"]


def test_vlm_encoders_and_projector_on_the_first_stage():
    names = generate_stage_module_names(mistral3(), 2)
    assert names[0][:3] == [
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.language_model.embed_tokens",
    ]
    assert names[1][-2:] == ["model.language_model.norm", "lm_head"]
    gemma = generate_stage_module_names(CASES["gemma4_vlm"](), 4)
    assert {"model.vision_tower", "model.embed_vision"} <= set(gemma[0])


def test_stage_copies_keep_names_and_original_model():
    model = llama()
    names = generate_stage_module_names(model, 4)
    stages = split_model_into_stages(model, names, [1, 3])
    assert [sorted(s.model.layers.keys()) for s in stages] == [["1"], ["3"]]
    assert stages[0].model.embed_tokens is None and stages[0].lm_head is None
    assert stages[1].model.norm is not None and stages[1].lm_head is not None
    assert {n for n, _ in stages[1].named_parameters()} == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.layers.3.", "model.norm", "lm_head"))
    }
    assert len(model.model.layers) == 4 and model.lm_head is not None  # untouched


def test_meta_model_split_allocates_only_the_stage():
    ref = llama()
    with torch.device("meta"):
        meta = llama()
    names = generate_stage_module_names(meta, 2)
    (last,) = split_model_into_stages(meta, names, [1])
    materialize_stage(last, "cpu", ref.state_dict())
    assert not any(p.is_meta for p in last.parameters())
    assert all(p.is_meta for p in meta.parameters())  # the full model never got storage
    (first,) = split_model_into_stages(ref, names, [0])  # stage 0 from the real model
    ids = torch.randint(6, 90, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(last(first(ids)), ref(ids).logits, rtol=0, atol=0)
    with pytest.raises(KeyError, match="lacks this stage's keys"):
        materialize_stage(split_model_into_stages(meta, names, [0])[0], "cpu", {})


def test_more_stages_than_layers_and_bad_layers_per_stage():
    with pytest.raises(ValueError, match="num_stages=5 is more than the 4 decoder layers"):
        generate_stage_module_names(llama(), 5)
    with pytest.raises(ValueError, match=r"layers_per_stage=\[2, 1\].*summing to the 4"):
        generate_stage_module_names(llama(), 2, layers_per_stage=[2, 1])
    with pytest.raises(ValueError, match="num_stages=0"):
        generate_stage_module_names(llama(), 0)


def test_every_parameter_on_exactly_one_stage():
    model = llama()
    names = generate_stage_module_names(model, 2)
    names[1].remove("lm_head")
    with pytest.raises(ValueError, match=r"on no stage: \['lm_head.weight'\]"):
        split_model_into_stages(model, names, [0])
    names[1].append("model")
    with pytest.raises(ValueError, match="on several stages"):
        split_model_into_stages(model, names, [0])
    with pytest.raises(ValueError, match="not modules"):
        split_model_into_stages(model, [["model.nope"]], [0])
    with pytest.raises(ValueError, match="no decoder `layers`"):
        generate_stage_module_names(nn.Linear(2, 2), 1)


def test_schedule_names():
    assert {"GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV"} <= set(SCHEDULES)
    assert get_schedule_spec("interleaved1f1b").cls_name == "ScheduleInterleaved1F1B"
    with pytest.raises(ValueError, match=r"unknown pipeline schedule 'Zigzag'; accepted: \["):
        get_schedule_spec("Zigzag")
    assert stage_indices_for_rank(1, 4, 2, "loop") == [1, 5]
    assert stage_indices_for_rank(1, 4, 2, "v") == [1, 6]
    with pytest.raises(ValueError, match="exactly 2 stages"):
        stage_indices_for_rank(0, 2, 3, "v")


def test_pipeline_model_rejects_bad_input_before_any_process_group_work():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="unknown pipeline schedule 'Zigzag'"):
        pipeline_model(llama(), schedule="Zigzag", n_microbatches=2)
    with pytest.raises(ValueError, match="n_microbatches=0"):
        pipeline_model(llama(), schedule="1F1B", n_microbatches=0)
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        pipeline_model(llama(tie_word_embeddings=True), schedule="1F1B", n_microbatches=2)
    with pytest.raises(ValueError, match="one stage per rank"):
        pipeline_model(llama(), schedule="GPipe", n_microbatches=2, stages_per_rank=2)
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        pipeline_model(llama(), schedule="1F1B", n_microbatches=2)


def test_one_stage_pipeline_equals_the_model(one_rank_world):
    import torch.nn.functional as F

    model = llama()
    pp = pipeline_model(model, schedule="GPipe", n_microbatches=2)
    ids = torch.randint(6, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 4:] = -100
    loss = pp.step(ids, labels)
    ref = F.cross_entropy(
        model(ids).logits.flatten(0, 1),
        F.pad(labels[:, 1:], (0, 1), value=-100).flatten(),
        ignore_index=-100,
    )
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    ref_grads = dict(model.named_parameters())
    for name, p in pp.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="batch size 5 is not divisible by n_microbatches=2"):
        pp.step(torch.cat([ids, ids[:1]]), torch.cat([labels, labels[:1]]))
    with pytest.raises(ValueError, match="microbatch_kwargs has 3 entries"):
        pp.step(ids, labels, microbatch_kwargs=[{}, {}, {}])


def test_attention_mask_reaches_every_stage_and_cache_position_is_rejected(one_rank_world):
    """Two stages on this rank (Interleaved1F1B), left padding differing per row and so per
    microbatch: loss and gradients equal one process with the same attention_mask."""
    import torch.nn.functional as F

    model = llama()
    pp = pipeline_model(model, schedule="Interleaved1F1B", n_microbatches=2)
    assert pp.stage_indices == [0, 1] and pp.num_stages == 2
    ids = torch.randint(6, 90, (4, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 4, 2, 6]):
        mask[row, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss = pp.step(ids, labels, attention_mask=mask)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
    ref = F.cross_entropy(model(ids, attention_mask=mask).logits.flatten(0, 1), targets)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    ref_grads = dict(model.named_parameters())
    for name, p in pp.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        unpadded = F.cross_entropy(model(ids).logits.flatten(0, 1), targets)
    assert abs(float(unpadded) - float(ref.detach())) > 1e-3  # the mask mattered
    with pytest.raises(ValueError, match=r"\['cache_position'\] would reach only the first"):
        pp.step(ids, ids, cache_position=torch.arange(10))


def test_eval_step_rejects_what_torch_eval_cannot_run(one_rank_world):
    ids = torch.randint(6, 90, (2, 8))
    pp = pipeline_model(llama(), schedule="ZBVZeroBubble", n_microbatches=2)
    assert pp.stage_indices == [0, 1]
    with pytest.raises(NotImplementedError, match="V-shaped schedule"):
        pp.eval_step(ids, ids)
    # Interleaved on one rank: stages 0 and 1 hand off locally (torch fails on its backward).
    pp = pipeline_model(llama(), schedule="Interleaved1F1B", n_microbatches=2)
    with pytest.raises(NotImplementedError, match=r"consecutive stages \[0, 1\] on one rank"):
        pp.eval_step(ids, ids)


def test_pp_group_may_be_a_device_mesh(one_rank_world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("pp",))
    pp = pipeline_model(llama(), mesh["pp"], "1F1B", 2)
    ids = torch.randint(6, 90, (2, 8))
    loss = pp.step(ids, ids)
    assert pp.stage_indices == [0] and torch.isfinite(loss)
    assert all(p.grad is not None for p in pp.parameters())


def test_eval_step_gives_the_loss_and_leaves_gradients_alone(one_rank_world):
    import torch.nn.functional as F

    model = llama()
    pp = pipeline_model(model, schedule="1F1B", n_microbatches=2)
    ids = torch.randint(6, 90, (4, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = F.cross_entropy(
            model(ids).logits.flatten(0, 1), F.pad(ids[:, 1:], (0, 1), value=-100).flatten()
        )
    loss = pp.eval_step(ids, ids)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    assert all(p.grad is None for p in pp.parameters())
    torch.testing.assert_close(pp.step(ids, ids), ref, rtol=1e-6, atol=0)  # training after eval
    assert all(p.grad is not None for p in pp.parameters())
