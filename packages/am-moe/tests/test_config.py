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


_INT_FIELDS = (
    "n_routed_experts",
    "n_shared_experts",
    "n_activated_experts",
    "n_expert_groups",
    "n_limited_groups",
    "dim",
    "inter_dim",
    "moe_inter_dim",
    "shared_expert_inter_dim",
    "moe_latent_size",
)
_BOOL_FIELDS = (
    "train_gate",
    "norm_topk_prob",
    "router_bias",
    "expert_bias",
    "shared_expert_gate",
    "force_e_score_correction_bias",
)
_FLOAT_FIELDS = (
    "gate_bias_update_factor",
    "aux_loss_coeff",
    "route_scale",
    "activation_alpha",
    "activation_limit",
)


@pytest.mark.parametrize(
    ("field", "bad"),
    [(f, bad) for f in _INT_FIELDS for bad in ("2", 2.0, True)],
)
def test_int_fields_of_the_wrong_type_are_rejected_naming_the_field(field, bad):
    with pytest.raises(TypeError, match=f"MoEConfig.{field}={bad!r} must be an int"):
        MoEConfig(**_kwargs(**{field: bad}))


@pytest.mark.parametrize(
    ("field", "bad"),
    [(f, bad) for f in _BOOL_FIELDS for bad in ("yes", 1, None)],
)
def test_bool_fields_of_the_wrong_type_are_rejected_naming_the_field(field, bad):
    with pytest.raises(TypeError, match=f"MoEConfig.{field}={bad!r} must be a bool"):
        MoEConfig(**_kwargs(**{field: bad}))


@pytest.mark.parametrize(
    ("field", "bad"),
    [(f, bad) for f in _FLOAT_FIELDS for bad in ("0.01", None, True)],
)
def test_float_fields_of_the_wrong_type_are_rejected_naming_the_field(field, bad):
    with pytest.raises(TypeError, match=f"MoEConfig.{field}={bad!r} must be a float"):
        MoEConfig(**_kwargs(**{field: bad}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_expert_groups=-2), "n_expert_groups=-2 must be an int >= 0"),
        (dict(n_limited_groups=-1), "n_limited_groups=-1 must be an int >= 0"),
        (dict(n_shared_experts=-1), "n_shared_experts=-1 must be an int >= 0"),
        (dict(route_scale=float("nan")), "route_scale=nan must be a finite float"),
        (dict(route_scale=-1.0), "route_scale=-1.0 must be > 0"),
        (dict(route_scale=0.0), "route_scale=0.0 must be > 0"),
        (dict(route_scale=float("inf")), "route_scale=inf must be a finite float"),
        (dict(aux_loss_coeff=float("nan")), "aux_loss_coeff=nan must be a finite float"),
        (dict(gate_bias_update_factor=-1e-3), "gate_bias_update_factor=-0.001 must be >= 0"),
        (dict(activation_alpha=float("-inf")), "activation_alpha=-inf must be a finite"),
        (dict(activation_limit=0.0), "activation_limit=0.0 must be > 0"),
        (dict(score_func=1), "score_func=1 is not supported"),
        (dict(expert_activation=None), "expert_activation=None is not supported"),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=f"MoEConfig.{message}"):
        MoEConfig(**_kwargs(**overrides))


def test_ints_are_accepted_for_floats_and_stored_as_floats():
    config = MoEConfig(**_kwargs(route_scale=2, aux_loss_coeff=0))
    assert config.route_scale == 2.0 and isinstance(config.route_scale, float)
    assert isinstance(config.aux_loss_coeff, float)
