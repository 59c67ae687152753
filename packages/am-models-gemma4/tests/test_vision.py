"""Images: features merged at image-token positions (two images of different sizes, one
padded), the vision attention mask, packed documents, generation with an image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _gemma4_helpers import (
    VOCAB,
    cpu_backend,
    gemma4_config,
    randomize_hf,
    rel_err,
    tiny_moe_text,
    tiny_vision,
)
from transformers import Gemma4ForConditionalGeneration as HFGemma4
from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask

from am_models_gemma4 import (
    Gemma4ForConditionalGeneration,
    _build_packed_gemma4_causal_mask_mapping,
)

IMG = VOCAB - 1
WINDOW = 6  # tiny_moe_text's sliding window
PATCH_PIXELS = 3 * 2 * 2  # patch_size 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    config = gemma4_config(tiny_moe_text(use_bidirectional_attention="vision"), tiny_vision())
    hf = randomize_hf(HFGemma4(config)).eval()
    path = tmp_path_factory.mktemp("hf_gemma4_vlm")
    hf.save_pretrained(path)
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend())
    return hf, ours


def _image(width: int, height: int, max_patches: int, seed: int):
    """Patchified pixels [max_patches, 12], positions [max_patches, 2] (-1 = padding), and
    the number of soft tokens (valid patches / pooling_kernel_size**2)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[x, y] for y in range(height) for x in range(width)])
    pixels = torch.rand(max_patches, PATCH_PIXELS, generator=gen)
    positions = torch.full((max_patches, 2), -1)
    positions[: len(grid)] = grid
    pixels[len(grid) :] = 0
    return pixels, positions, len(grid) // 4


def _two_image_batch():
    big = _image(4, 8, 32, seed=1)  # 8 soft tokens: longer than the sliding window
    small = _image(4, 2, 32, seed=2)  # 2 soft tokens, 24 padded patches
    rows = [[5] * 3 + [IMG] * big[2] + [7] * 5, [6] * 6 + [IMG] * small[2] + [8] * 8]
    length = max(map(len, rows))
    ids = torch.tensor([r + [9] * (length - len(r)) for r in rows])
    pixels = torch.stack([big[0], small[0]])
    positions = torch.stack([big[1], small[1]])
    return ids, pixels, positions, (ids == IMG).long()


def test_two_images_of_different_sizes_match_transformers(saved):
    hf, ours = saved
    ids, pixels, positions, mm = _two_image_batch()
    kwargs = dict(pixel_values=pixels, image_position_ids=positions, mm_token_type_ids=mm)
    ref = hf(ids, labels=ids, **kwargs)
    out = ours(ids, labels=ids, **kwargs)
    assert rel_err(out.logits, ref.logits) <= 1e-5
    with torch.no_grad():  # the image really reaches the logits
        assert rel_err(ours(ids).logits, ref.logits) > 1e-3
    hf.zero_grad()
    ref.loss.backward()
    out.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        if name.startswith(("model.vision_tower.", "model.embed_vision.")):
            assert rel_err(param.grad, hf_params[name].grad) <= 1e-4, name
    ours.zero_grad()


def test_vision_mask_rule_full_causal_sliding_windowed(saved):
    """Full layers: causal only (no image bidirectionality). Sliding layers: inside the
    window AND (causal OR same image). Checked on transformers' own masks too."""
    hf, _ = saved
    ids, _, _, mm = _two_image_batch()
    embeds = torch.zeros(*ids.shape, 32)
    ref = HFGemma4.create_masks_for_generate(
        hf.config, embeds, None, None, torch.arange(ids.shape[1])[None], mm_token_type_ids=mm
    )
    ours = _build_packed_gemma4_causal_mask_mapping(torch.ones_like(ids), mm, torch.float32, WINDOW)
    first, last = 3, 3 + 8 - 1  # the 8-token image of row 0
    full, sliding = ours["full_attention"][0, 0], ours["sliding_attention"][0, 0]
    assert not full[first, last]  # no future image token on full layers
    assert sliding[first, last]  # the whole image, bidirectionally, on sliding layers ...
    assert not sliding[last, first]  # ... but never past the window (distance 7 >= 6)
    assert sliding[last, last - WINDOW + 1] and not sliding[last + 1, last + 1 - WINDOW]
    for kind in ("full_attention", "sliding_attention"):
        theirs = ref[kind] if ref[kind] is not None else None
        if theirs is None:  # sdpa's plain-causal shortcut
            theirs = torch.ones_like(ours[kind]).tril()
        assert torch.equal(theirs.bool(), ours[kind]), kind


def test_packed_documents_equal_each_document_alone(saved):
    """3 documents in one row (the middle one with an image, longer than the window) give
    the logits and gradients of each document run alone."""
    _, ours = saved
    pixels, positions, n_img = _image(4, 8, 32, seed=3)
    docs = [[11, 12, 13, 14, 15], [5, 6] + [IMG] * n_img + [7, 8, 9], [21, 22, 23, 24]]
    ids = torch.tensor([sum(docs, [])])
    seq_ids = torch.tensor([sum(([i + 1] * len(d) for i, d in enumerate(docs)), [])])
    mm = (ids == IMG).long()
    positions_1d = torch.cat([torch.arange(len(d)) for d in docs])[None]
    masks = _build_packed_gemma4_causal_mask_mapping(
        seq_ids, mm, torch.float32, WINDOW, as_additive=True
    )

    def summed_loss(logits, labels):
        return F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum")

    packed = ours(
        ids,
        attention_mask=masks,
        position_ids=positions_1d,
        pixel_values=pixels[None],
        image_position_ids=positions[None],
    ).logits
    starts = [0, len(docs[0]), len(docs[0]) + len(docs[1])]
    total = sum(
        summed_loss(packed[:, s : s + len(d)], ids[:, s : s + len(d)])
        for s, d in zip(starts, docs, strict=True)
    )
    total.backward()
    packed_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()

    alone_total = 0
    for start, doc in zip(starts, docs, strict=True):
        doc_ids = torch.tensor([doc])
        extra = {}
        if IMG in doc:
            extra = dict(pixel_values=pixels[None], image_position_ids=positions[None])
            extra["mm_token_type_ids"] = (doc_ids == IMG).long()
        logits = ours(doc_ids, **extra).logits
        assert rel_err(packed[:, start : start + len(doc)], logits) <= 1e-5
        alone_total = alone_total + summed_loss(logits, doc_ids)
    alone_total.backward()
    assert abs(total.item() - alone_total.item()) <= 1e-5 * alone_total.item()
    for name, param in ours.named_parameters():
        if param.grad is not None:
            assert rel_err(packed_grads[name], param.grad) <= 1e-4, name
    ours.zero_grad()


def test_packed_block_masks_through_flex_equal_dense_masks_through_sdpa(saved):
    """The mapping's flex BlockMasks (as_block_mask=True) drive attn='flex': the same logits
    (torch's FlexAttention, no grad) and gradients (CPU autograd) as the dense masks."""
    _, ours = saved
    flex = Gemma4ForConditionalGeneration(ours.config, backend=cpu_backend(attn="flex"))
    flex.load_state_dict(ours.state_dict())
    pixels, positions, n_img = _image(4, 8, 32, seed=3)
    docs = [[11, 12, 13, 14, 15], [5, 6] + [IMG] * n_img + [7, 8, 9], [21, 22, 23]]
    ids = torch.tensor([sum(docs, [])])
    seq_ids = torch.tensor([sum(([i + 1] * len(d) for i, d in enumerate(docs)), [])])
    mm = (ids == IMG).long()
    extra = dict(
        position_ids=torch.cat([torch.arange(len(d)) for d in docs])[None],
        pixel_values=pixels[None],
        image_position_ids=positions[None],
        mm_token_type_ids=mm,
    )
    dense = _build_packed_gemma4_causal_mask_mapping(seq_ids, mm, torch.float32, WINDOW)
    blocks = _build_packed_gemma4_causal_mask_mapping(
        seq_ids, mm, torch.float32, WINDOW, as_block_mask=True, flex_block_size=4
    )
    with torch.no_grad():
        want = ours(ids, attention_mask=dense, **extra).logits
        got = flex(ids, attention_mask=blocks, **extra).logits
    assert rel_err(got, want) <= 1e-5
    grads = []
    for model, masks in ((ours, dense), (flex, blocks)):
        model.zero_grad()
        model(ids, attention_mask=masks, labels=ids, **extra).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    # 1e-4 as the other gradient checks here: the vision tower's attention gradients carry
    # ~4e-5 of fp32 rounding against an fp64 run with either kernel (measured: sdpa's chunked
    # GEMMs 4.3e-5, flex 4.1e-5), so two fp32 kernels can differ by that much.
    for name, grad in grads[0].items():
        assert rel_err(grads[1][name], grad) <= 1e-4, name
    with pytest.raises(ValueError, match="BlockMask needs attn='flex'"):
        ours(ids, attention_mask=blocks, **extra)


def test_packed_mask_forms_and_document_isolation():
    seq_ids = torch.tensor([[1, 1, 1, 2, 2, 0]])
    mm = torch.tensor([[0, 1, 1, 1, 1, 0]])  # an image run across the document boundary
    masks = _build_packed_gemma4_causal_mask_mapping(seq_ids, mm, torch.float32, 4)
    sliding = masks["sliding_attention"][0, 0]
    assert sliding[1, 2] and not sliding[2, 3] and not sliding[3, 1]  # images end at doc edges
    assert sliding[3, 4]  # same image in document 2, bidirectional
    assert not masks["full_attention"][0, 0, 3, 4]
    for kind in masks:  # no real query sees padding; the padding row stays finite
        assert not masks[kind][0, 0, :5, 5].any() and masks[kind][0, 0, 5].any()
    additive = _build_packed_gemma4_causal_mask_mapping(
        seq_ids, mm, torch.bfloat16, 4, as_additive=True
    )
    assert additive["sliding_attention"].dtype == torch.bfloat16
    assert torch.equal(additive["sliding_attention"] == 0, masks["sliding_attention"])
    blocks = _build_packed_gemma4_causal_mask_mapping(
        seq_ids, mm, torch.float32, 4, as_block_mask=True, flex_block_size=2
    )
    q, k = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    zero = torch.zeros_like(q)
    for kind, block in blocks.items():
        assert block.BLOCK_SIZE == (2, 2)
        assert torch.equal(block.mask_mod(zero, zero, q, k), masks[kind][0, 0]), kind
    with pytest.raises(ValueError, match="at most one"):
        _build_packed_gemma4_causal_mask_mapping(
            seq_ids, mm, torch.float32, 4, as_additive=True, as_block_mask=True
        )


def test_greedy_generate_with_an_image_equals_transformers(saved):
    hf, ours = saved
    pixels, positions, n_img = _image(4, 4, 16, seed=4)
    prompt = torch.tensor([[5, 6] + [IMG] * n_img + [7]])
    kwargs = dict(
        pixel_values=pixels[None],
        image_position_ids=positions[None],
        mm_token_type_ids=(prompt == IMG).long(),
        max_new_tokens=16,
        do_sample=False,
    )
    with torch.no_grad():
        expected = hf.generate(prompt, **kwargs)
        got = ours.generate(prompt, **kwargs)
    assert got.shape[1] == prompt.shape[1] + 16
    assert torch.equal(got, expected)


def test_block_ids_match_transformers_for_one_document():
    mm = torch.tensor([[0, 1, 1, 0, 1, 0]])
    from am_models_gemma4.masks import _image_block_ids

    assert torch.equal(
        _image_block_ids(mm, torch.ones_like(mm)), get_block_sequence_ids_for_mask(mm, "cpu")
    )


def test_pre_embedding_for_cp_merges_the_images_as_the_forward_does(saved):
    _, ours = saved
    ids, pixels, positions, mm = _two_image_batch()
    kwargs = dict(pixel_values=pixels, image_position_ids=positions, mm_token_type_ids=mm)
    with torch.no_grad():
        embeds = ours(ids, _pre_embed_only=True, **kwargs)
        assert embeds.shape == (*ids.shape, 32)
        batch = ours.prepare_model_inputs_for_cp(ids, **kwargs)
        assert torch.equal(batch["inputs_embeds"], embeds)
        assert batch["_cp_make_batch_fn"] == ours._cp_shard_batch
        expected = ours(ids, **kwargs).logits
        got = ours(inputs_embeds=embeds, mm_token_type_ids=mm).logits
    assert rel_err(got, expected) <= 1e-6
    with pytest.raises(ValueError, match="image token positions"):
        ours.prepare_inputs_embeds_for_cp(ids[:, :5], pixels, positions)
