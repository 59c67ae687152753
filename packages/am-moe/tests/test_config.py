"""MoEConfig validation and derived properties."""

import pytest
import torch

from am_moe.config import MoEConfig


def _kwargs(**overrides):
    base = dict(
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=2,
        n_limited_groups=1,
        train_gate=True,
        gate_bias_update_factor=0.0,
        aux_loss_coeff=0.0,
        score_func="sigmoid",
        route_scale=1.0,
        dim=16,
        inter_dim=32,
        moe_inter_dim=8,
        norm_topk_prob=True,
    )
    base.update(overrides)
    return base


def test_keyword_only_and_defaults():
    with pytest.raises(TypeError):
        MoEConfig(8, 1, 2)  # type: ignore[misc]
    config = MoEConfig(**_kwargs())
    assert config.dtype == torch.bfloat16
    assert config.expert_activation == "swiglu" and config.moe_latent_size is None
    assert config.expert_dim == 16 and config.shared_inter_dim == 8
    assert not config.uses_correction_bias


@pytest.mark.parametrize(
    ("value", "dtype"),
    [("float32", torch.float32), ("bf16", torch.bfloat16), (torch.float16, torch.float16)],
)
def test_dtype_accepts_strings(value, dtype):
    assert MoEConfig(**_kwargs(dtype=value)).dtype == dtype


def test_derived_properties():
    config = MoEConfig(
        **_kwargs(moe_latent_size=4, shared_expert_inter_dim=24, force_e_score_correction_bias=True)
    )
    assert config.expert_dim == 4 and config.shared_inter_dim == 24 and config.uses_correction_bias
    assert MoEConfig(**_kwargs(gate_bias_update_factor=1e-3)).uses_correction_bias
    # 0 groups is the reference's "no grouping".
    assert MoEConfig(**_kwargs(n_expert_groups=0, n_limited_groups=0)).n_expert_groups == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_activated_experts=9), "n_activated_experts=9 exceeds n_routed_experts=8"),
        (dict(n_expert_groups=3), "n_expert_groups=3 does not divide n_routed_experts=8"),
        (dict(n_limited_groups=3), "n_limited_groups=3 exceeds n_expert_groups=2"),
        (dict(n_activated_experts=5), "exceeds the 4 experts reachable"),
        (dict(expert_activation="gelu"), "expert_activation='gelu' is not supported; accepted"),
        (dict(shared_expert_activation="tanh"), "shared_expert_activation='tanh'"),
        (
            dict(score_func="relu"),
            "score_func='relu' is not supported; accepted: \\['softmax', 'sigmoid'\\]",
        ),
        (dict(dtype="int8"), "MoEConfig.dtype='int8'"),
        (dict(dim=0), "dim=0 must be an int >= 1"),
        (dict(moe_latent_size=-2), "moe_latent_size=-2"),
        (dict(aux_loss_coeff=-1.0), "must be >= 0"),
        (dict(gate_bias_update_factor=0.1, train_gate=False), "needs train_gate=True"),
    ],
)
def test_invalid_combinations_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**_kwargs(**overrides))
