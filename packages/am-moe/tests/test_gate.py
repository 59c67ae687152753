"""Gate routing math against brute-force references; balancing bias; aux loss; precision."""

import itertools

import pytest
import torch
from _am_moe_test_config import small_moe_config

from am_dtype.backend import BackendConfig
from am_moe.config import MoEConfig
from am_moe.gate import FakeBalancedGate, Gate

E, D = 8, 12


def _config(**overrides) -> MoEConfig:
    fields = dict(
        n_routed_experts=E,
        n_activated_experts=2,
        dim=D,
        inter_dim=16,
        moe_inter_dim=8,
        norm_topk_prob=False,
    )
    fields.update(overrides)
    return small_moe_config(**fields)


def _gate(backend=None, **overrides) -> Gate:
    torch.manual_seed(0)
    gate = Gate(_config(**overrides), backend)
    gate.init_weights(torch.device("cpu"), init_std=0.5)
    return gate


def _x(t=16, seed=1):
    return torch.randn(
        t, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    ).float()


def _sorted(t):
    return t.sort(dim=-1).values


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm", [False, True])
def test_weights_are_selected_scores(score_func, norm):
    gate = _gate(score_func=score_func, norm_topk_prob=norm, route_scale=1.7, n_activated_experts=3)
    x = _x()
    weights, indices, aux = gate(x, torch.ones(16, dtype=torch.bool))
    logits = x.double() @ gate.weight.double().T
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    top = scores.topk(3, dim=-1)
    expected = top.values / top.values.sum(-1, keepdim=True) if norm else top.values
    assert torch.equal(_sorted(indices), _sorted(top.indices))
    # Compare as expert -> weight maps (order inside top-k is not part of the contract).
    got = torch.zeros(16, E, dtype=torch.float64).scatter_(1, indices, weights.double())
    want = torch.zeros(16, E, dtype=torch.float64).scatter_(1, top.indices, expected * 1.7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert aux is None


def _brute_force_group_topk(choice_TE, n_groups, topk_groups, k, use_top2):
    """For every token, try every allowed group set and keep the best group set's top-k."""
    t = choice_TE.shape[0]
    per = E // n_groups
    out = []
    for row in choice_TE:
        groups = row.view(n_groups, per)
        group_score = groups.topk(2, -1).values.sum(-1) if use_top2 else groups.amax(-1)
        best = max(
            itertools.combinations(range(n_groups), topk_groups),
            key=lambda c: group_score[list(c)].sum(),
        )
        allowed = torch.tensor([g * per + j for g in best for j in range(per)])
        out.append(allowed[row[allowed].topk(k).indices])
    return torch.stack(out).view(t, k)


@pytest.mark.parametrize("with_bias", [False, True])
def test_group_limited_routing_matches_brute_force(with_bias):
    gate = _gate(
        score_func="sigmoid",
        n_expert_groups=4,
        n_limited_groups=2,
        n_activated_experts=3,
        force_e_score_correction_bias=with_bias,
    )
    if with_bias:
        gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = _x(32)
    _, indices, _ = gate(x)
    scores = (x @ gate.weight.T).sigmoid()
    choice = scores + gate.e_score_correction_bias if with_bias else scores
    expected = _brute_force_group_topk(choice, 4, 2, 3, use_top2=with_bias)
    assert torch.equal(_sorted(indices), _sorted(expected))


def test_correction_bias_changes_selection_not_weights():
    gate = _gate(score_func="sigmoid", force_e_score_correction_bias=True)
    x = _x()
    w0, i0, _ = gate(x)
    gate.e_score_correction_bias[3] = 10.0  # expert 3 now always wins a slot
    w1, i1, _ = gate(x)
    assert (i1 == 3).any(-1).all() and not (i0 == 3).any(-1).all()
    raw = (x @ gate.weight.T).sigmoid()
    torch.testing.assert_close(w1, raw.gather(1, i1))  # weights are unbiased scores


def test_update_bias_uses_load_since_last_update():
    gate = _gate(score_func="sigmoid", gate_bias_update_factor=0.01)
    gate.train()
    assert gate.e_score_correction_bias.dtype == torch.float32
    mask = torch.ones(16, dtype=torch.bool)
    mask[-4:] = False
    loads = []
    for seed in (1, 2):
        _, indices, _ = gate(_x(seed=seed), mask)
        loads.append(torch.bincount(indices[mask].flatten(), minlength=E).float())
    gate.update_bias()
    load = loads[0] + loads[1]
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(gate.e_score_correction_bias, expected)
    assert (expected != 0).any()

    # The next update only sees the forwards after the previous update.
    before = gate.e_score_correction_bias.clone()
    _, indices, _ = gate(_x(seed=3))
    gate.update_bias()
    load = torch.bincount(indices.flatten(), minlength=E).float()
    torch.testing.assert_close(
        gate.e_score_correction_bias, before + 0.01 * torch.sign(load.mean() - load)
    )
    # No forward since the last update: nothing moves.
    after = gate.e_score_correction_bias.clone()
    gate.update_bias()
    assert torch.equal(gate.e_score_correction_bias, after)


def test_update_bias_in_bf16_buffer_keeps_fp32_master():
    gate = _gate(score_func="sigmoid", gate_bias_update_factor=1e-3)
    gate.e_score_correction_bias = gate.e_score_correction_bias.to(torch.bfloat16).fill_(0.5)
    mask = torch.ones(16, dtype=torch.bool)
    total = torch.zeros(E)
    for seed in range(5):
        _, indices, _ = gate(_x(seed=seed), mask)
        load = torch.bincount(indices.flatten(), minlength=E).float()
        gate.update_bias()
        total += 1e-3 * torch.sign(load.mean() - load)
    # 0.5 +- 1e-3 is not representable in bf16: without the master copy nothing would move.
    expected = (0.5 + total).to(torch.bfloat16)
    assert torch.equal(gate.e_score_correction_bias, expected)
    assert gate._bias_master is not None and gate._bias_master.dtype == torch.float32


def test_update_bias_requires_factor():
    with pytest.raises(RuntimeError, match="gate_bias_update_factor"):
        _gate().update_bias()
    with pytest.raises(ValueError, match="train_gate=True"):
        _config(gate_bias_update_factor=0.1, train_gate=False)


def _aux_by_hand(scores_TE, indices_TK, mask_T, coeff, k):
    """DeepSeek-V3 sequence-wise balance loss for one sequence, valid tokens only."""
    valid = mask_T.nonzero().flatten()
    t = valid.numel()
    probs = scores_TE[valid] / scores_TE[valid].sum(-1, keepdim=True)
    load = torch.zeros(E, dtype=scores_TE.dtype)
    for tok in valid:
        for e in indices_TK[tok]:
            load[e] += 1
    f = load * E / (k * t)
    p = probs.sum(0) / t
    return coeff * (f * p).sum()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_loss_matches_formula_and_ignores_padding(score_func):
    gate = _gate(score_func=score_func, aux_loss_coeff=0.1)
    gate.train()
    x = _x(2 * 10).view(2, 10, D)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    _, indices, aux = gate(x, mask)
    scores = x.view(-1, D).double() @ gate.weight.double().T
    scores = scores.softmax(-1) if score_func == "softmax" else scores.sigmoid()
    per_seq = [
        _aux_by_hand(scores[b * 10 : (b + 1) * 10], indices[b * 10 : (b + 1) * 10], mask[b], 0.1, 2)
        for b in range(2)
    ]
    torch.testing.assert_close(aux.double(), (per_seq[0] + per_seq[1]) / 2, rtol=1e-5, atol=1e-7)
    aux.backward()
    assert gate.weight.grad.abs().sum() > 0
    # Changing padded tokens changes nothing.
    x2 = x.clone()
    x2[1, 6:] = 100.0
    _, _, aux2 = gate(x2, mask)
    torch.testing.assert_close(aux2, aux.detach())


def test_aux_loss_only_in_training():
    gate = _gate(aux_loss_coeff=0.1)
    gate.eval()
    assert gate(_x())[2] is None


def test_gate_precision_fp32_with_bf16_inputs():
    gate32 = _gate(
        BackendConfig(gate_precision="float32"), dtype=torch.bfloat16, score_func="sigmoid"
    )
    x = _x().bfloat16()
    weights, indices, _ = gate32(x)
    assert weights.dtype == torch.float32
    scores = (x.float() @ gate32.weight.float().T).sigmoid()
    torch.testing.assert_close(weights, scores.gather(1, indices))
    assert torch.equal(_sorted(indices), _sorted(scores.topk(2).indices))
    gate16 = _gate(dtype=torch.bfloat16, score_func="sigmoid")
    assert gate16(x)[0].dtype == torch.bfloat16


def test_train_gate_false_freezes_router():
    gate = _gate(train_gate=False, router_bias=True)
    assert not gate.weight.requires_grad and not gate.bias.requires_grad


def test_accepts_batched_input_and_checks_mask_size():
    gate = _gate()
    x = _x(12)
    w2, i2, _ = gate(x)
    w3, i3, _ = gate(x.view(3, 4, D))
    assert torch.equal(i2, i3) and torch.equal(w2, w3)
    with pytest.raises(ValueError, match="token_mask has 5 entries for 12 tokens"):
        gate(x, torch.ones(5, dtype=torch.bool))


def test_correction_bias_is_a_buffer_not_a_parameter():
    gate = _gate(force_e_score_correction_bias=True)
    assert "e_score_correction_bias" in gate.state_dict()
    assert "e_score_correction_bias" not in dict(gate.named_parameters())
    assert "e_score_correction_bias" not in _gate().state_dict()


def test_fake_balanced_gate_is_balanced():
    gate = FakeBalancedGate(_config(n_activated_experts=2))
    weights, indices, aux = gate(_x(16))
    assert aux is None and torch.all(weights == 0.5)
    assert torch.all(torch.bincount(indices.flatten(), minlength=E) == 4)
    noisy = FakeBalancedGate(_config(n_activated_experts=2), noise=5.0)
    _, noisy_idx, _ = noisy(_x(64))
    assert noisy_idx.shape == (64, 2) and (noisy_idx[:, 0] != noisy_idx[:, 1]).all()
    with pytest.raises(ValueError, match="noise=-1"):
        FakeBalancedGate(_config(), noise=-1)


def _cp_aux_worker(rank: int, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    gate = _gate(score_func="sigmoid", aux_loss_coeff=0.1)
    gate.train()
    x = _x(2 * 8).view(2, 8, D)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    full = gate(x, mask)[2]
    full.backward()
    full_grad = gate.weight.grad.clone()
    gate.zero_grad()
    piece = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    _, _, aux = gate(x[:, piece], mask[:, piece], cp_mesh=mesh)
    aux.backward()
    return aux.item(), full.item(), gate.weight.grad.tolist(), full_grad.tolist()


@pytest.mark.slow
@pytest.mark.distributed
def test_aux_loss_under_context_parallelism_matches_full_sequence():
    """Each CP rank holds half of every sequence: same loss; CP grads sum to the full grad."""
    from am_dtype.testing import run_distributed

    results = run_distributed(_cp_aux_worker, 2)
    for aux, full, _, _ in results:
        assert aux == pytest.approx(full, rel=1e-6)
    summed = torch.tensor(results[0][2]) + torch.tensor(results[1][2])
    torch.testing.assert_close(summed, torch.tensor(results[0][3]), rtol=1e-5, atol=1e-7)
