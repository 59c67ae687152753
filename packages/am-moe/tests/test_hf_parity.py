"""Our MoE reproduces transformers' NemotronH MoE block: outputs and gradients, fp32.

The transformers block is built from a tiny `NemotronHConfig`; its weights are carried into
our `MoE` through `am_moe.state_dict` (stacked transformers layout -> native). Tolerance:
rtol=1e-5 and atol=1e-6 times the reference's largest magnitude (same math, different fp32
summation order; weight gradients here reach ~30).
"""

import pytest
import torch

from am_dtype.backend import BackendConfig
from am_moe.config import MoEConfig
from am_moe.layers import MoE
from am_moe.state_dict import convert_hf_to_native

transformers = pytest.importorskip("transformers")
from transformers.models.nemotron_h import modeling_nemotron_h as hf  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
E, K, D, F_EXPERT, F_SHARED = 8, 2, 32, 16, 24


def _hf_block(latent: int | None, n_group: int, impl: str) -> torch.nn.Module:
    config = transformers.NemotronHConfig(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=F_EXPERT,
        moe_shared_expert_intermediate_size=F_SHARED,
        moe_latent_size=latent,
        n_group=n_group,
        topk_group=max(1, n_group // 2),
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        mlp_hidden_act="relu2",
    )
    config._experts_implementation = impl
    torch.manual_seed(0)
    block = hf.NemotronHMoE(config).float()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
        block.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return block


def _our_block(latent: int | None, n_group: int, experts_impl: str) -> MoE:
    config = MoEConfig(
        n_routed_experts=E,
        n_shared_experts=1,
        n_activated_experts=K,
        n_expert_groups=n_group,
        n_limited_groups=max(1, n_group // 2),
        train_gate=True,
        gate_bias_update_factor=0.0,
        aux_loss_coeff=0.0,
        score_func="sigmoid",
        route_scale=2.5,
        dim=D,
        inter_dim=64,
        moe_inter_dim=F_EXPERT,
        norm_topk_prob=True,
        expert_activation="relu2",
        shared_expert_inter_dim=F_SHARED,
        shared_expert_activation="relu2",
        force_e_score_correction_bias=True,
        moe_latent_size=latent,
        dtype="float32",
    )
    return MoE(config, BackendConfig(experts=experts_impl, linear="torch"))


def _assert_close(actual, expected, msg=None):
    atol = ATOL * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=msg)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    ("latent", "n_group", "hf_impl", "experts_impl"),
    [
        (None, 1, "eager", "torch_mm"),
        (None, 4, "grouped_mm", "torch"),
        (8, 1, "eager", "torch"),
        (8, 4, "grouped_mm", "torch_mm"),
    ],
)
def test_matches_transformers_nemotron_h_moe(latent, n_group, hf_impl, experts_impl):
    theirs = _hf_block(latent, n_group, hf_impl)
    ours = _our_block(latent, n_group, experts_impl)
    native = convert_hf_to_native(theirs.state_dict(), n_experts=E, gated=False)
    missing, unexpected = ours.load_state_dict(native, strict=True)
    assert not missing and not unexpected

    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    x_theirs, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    assert y_ours.shape == x.shape and y_ours.dtype == x.dtype
    _assert_close(y_ours, y_theirs)

    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (y_theirs * probe).sum().backward()
    (y_ours * probe).sum().backward()
    _assert_close(x_ours.grad, x_theirs.grad)
    ours_grads_as_hf = {
        k: v for k, v in _hf_named_grads(ours).items() if k in dict(theirs.named_parameters())
    }
    assert set(ours_grads_as_hf) == set(dict(theirs.named_parameters()))
    for name, grad in _grads(theirs).items():
        _assert_close(ours_grads_as_hf[name], grad, msg=name)


def _hf_named_grads(ours: MoE) -> dict[str, torch.Tensor]:
    """Our gradients renamed and re-laid-out as transformers' parameters."""
    from am_moe.state_dict import convert_native_to_hf

    grads = {n: p.grad for n, p in ours.named_parameters()}
    return convert_native_to_hf(grads, gated=False, layout="stacked")
