"""HF <-> native expert conversion: exact round trips, EP-local loading, whole-dict helpers."""

import pytest
import torch

from am_moe.state_dict import (
    ExpertCheckpointError,
    convert_hf_to_native,
    convert_native_to_hf,
    hf_to_native_experts,
    local_expert_range,
    native_to_hf_experts,
)

E, D, F = 4, 6, 3
P = "model.layers.1.mixer."


def _per_expert_hf(gated: bool, bias: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(E):
        names = ("gate", "up") if gated else ("up",)
        for name in names:
            sd[f"{P}experts.{i}.{name}_proj.weight"] = torch.randn(F, D, generator=g)
            if bias:
                sd[f"{P}experts.{i}.{name}_proj.bias"] = torch.randn(F, generator=g)
        sd[f"{P}experts.{i}.down_proj.weight"] = torch.randn(D, F, generator=g)
        if bias:
            sd[f"{P}experts.{i}.down_proj.bias"] = torch.randn(D, generator=g)
    sd[f"{P}gate.weight"] = torch.randn(E, D, generator=g)
    sd[f"{P}shared_experts.up_proj.weight"] = torch.randn(F, D, generator=g)
    return sd


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_per_expert_round_trip_is_exact(gated, bias):
    hf = _per_expert_hf(gated, bias)
    native = convert_hf_to_native(hf, n_experts=E, gated=gated)
    h = 2 * F if gated else F
    assert native[f"{P}experts.gate_and_up_projs"].shape == (E, D, h)
    assert native[f"{P}experts.down_projs"].shape == (E, F, D)
    assert (f"{P}experts.gate_up_proj_bias" in native) is bias
    assert torch.equal(native[f"{P}gate.weight"], hf[f"{P}gate.weight"])
    assert torch.equal(
        native[f"{P}shared_experts.up_proj.weight"], hf[f"{P}shared_experts.up_proj.weight"]
    )
    _assert_same(convert_native_to_hf(native, gated=gated), hf)


def test_layout_semantics_gate_half_first():
    hf = _per_expert_hf(gated=True)
    native = hf_to_native_experts(hf, prefix=P, n_experts=E, gated=True)
    w = native[f"{P}experts.gate_and_up_projs"]
    x = torch.randn(2, D)
    for i in range(E):
        gate = x @ hf[f"{P}experts.{i}.gate_proj.weight"].T
        up = x @ hf[f"{P}experts.{i}.up_proj.weight"].T
        torch.testing.assert_close(x @ w[i], torch.cat([gate, up], dim=-1))
        down = native[f"{P}experts.down_projs"][i]
        torch.testing.assert_close(up @ down, up @ hf[f"{P}experts.{i}.down_proj.weight"].T)


@pytest.mark.parametrize("gated", [False, True])
def test_stacked_and_per_expert_layouts_agree(gated):
    hf = _per_expert_hf(gated, bias=True)
    native = convert_hf_to_native(hf, n_experts=E, gated=gated)
    stacked = convert_native_to_hf(native, gated=gated, layout="stacked")
    up_name = "gate_up_proj" if gated else "up_proj"
    assert stacked[f"{P}experts.{up_name}"].shape == (E, (2 if gated else 1) * F, D)
    _assert_same(convert_hf_to_native(stacked, n_experts=E, gated=gated), native)


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_ep_local_range_loads_only_local_experts(layout):
    hf = _per_expert_hf(gated=True)
    full = convert_hf_to_native(hf, n_experts=E, gated=True)
    source = (
        hf if layout == "per_expert" else convert_native_to_hf(full, gated=True, layout="stacked")
    )
    start, stop = local_expert_range(E, ep_rank=1, ep_size=2)
    assert (start, stop) == (2, 4)
    if layout == "per_expert":  # experts 0 and 1 are not even present: they must not be read
        source = {
            k: v for k, v in source.items() if ".experts.0." not in k and ".experts.1." not in k
        }
    local = hf_to_native_experts(
        source, prefix=P, n_experts=E, gated=True, layout=layout, expert_range=(start, stop)
    )
    for key in (f"{P}experts.gate_and_up_projs", f"{P}experts.down_projs"):
        assert torch.equal(local[key], full[key][start:stop])
    back = native_to_hf_experts(local, prefix=P, gated=True, expert_offset=start)
    _assert_same(back, {k: v for k, v in hf.items() if any(f".experts.{i}." in k for i in (2, 3))})


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="n_experts=6 must divide evenly over ep_size=4"):
        local_expert_range(6, 0, 4)
    with pytest.raises(ValueError, match="ep_rank=2"):
        local_expert_range(4, 2, 2)
    with pytest.raises(ValueError, match="layout='fused'"):
        hf_to_native_experts({}, prefix=P, n_experts=E, gated=True, layout="fused")
    with pytest.raises(ValueError, match="expert_range=\\(3, 9\\)"):
        hf_to_native_experts({}, prefix=P, n_experts=E, gated=True, expert_range=(3, 9))
    hf = _per_expert_hf(gated=True)
    del hf[f"{P}experts.2.up_proj.weight"]
    with pytest.raises(KeyError, match="experts.2.up_proj.weight"):
        convert_hf_to_native(hf, n_experts=E, gated=True)


def test_expert_keys_the_model_does_not_use_are_kept_for_the_loader_to_report():
    hf = _per_expert_hf(gated=False)
    unused = {
        f"{P}experts.{E}.up_proj.weight": torch.zeros(F, D),  # beyond the model's E experts
        f"{P}experts.{E}.down_proj.weight": torch.zeros(D, F),
        f"{P}experts.0.gate_proj.weight": torch.zeros(F, D),  # relu2 experts have no gate
    }
    native = convert_hf_to_native({**hf, **unused}, n_experts=E, gated=False)
    for key, value in unused.items():
        assert native[key] is value, key
    _assert_same(
        {k: v for k, v in native.items() if k not in unused},
        convert_hf_to_native(hf, n_experts=E, gated=False),
    )
    # Under EP the other ranks' experts are used (there), not reported.
    local = convert_hf_to_native(hf, n_experts=E, gated=False, expert_range=(0, 2))
    assert not any(".experts.3." in k or ".experts.2." in k for k in local)


def test_missing_and_misshaped_expert_tensors_are_all_named(caplog):
    hf = _per_expert_hf(gated=True)
    del hf[f"{P}experts.2.up_proj.weight"]
    hf[f"{P}experts.1.down_proj.weight"] = torch.zeros(D, F + 1)
    hf[f"{P}experts.3.gate_proj.weight"] = torch.zeros(F, D + 1)
    with pytest.raises(ExpertCheckpointError) as info:
        convert_hf_to_native(hf, n_experts=E, gated=True)
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    assert err.missing == [f"{P}experts.2.up_proj.weight"]
    assert {k for k, _ in err.mismatched} == {
        f"{P}experts.1.down_proj.weight",
        f"{P}experts.3.gate_proj.weight",
    }
    assert (
        f"{P}experts.1.down_proj.weight: shape [6, 4], other experts of this block: [6, 3]"
        in str(err)
    )
    with caplog.at_level("WARNING"):
        native = convert_hf_to_native(hf, n_experts=E, gated=True, strict=False)
    assert f"{P}experts.2.up_proj.weight" in caplog.text
    assert f"{P}experts.gate_and_up_projs" not in native  # left for the loader to re-init
    assert torch.equal(native[f"{P}gate.weight"], hf[f"{P}gate.weight"])


def test_stacked_layout_checks_the_expert_dim_and_the_activation():
    stacked = native_to_hf_experts(
        convert_hf_to_native(_per_expert_hf(gated=False), n_experts=E, gated=False),
        prefix=P,
        gated=False,
        layout="stacked",
    )
    with pytest.raises(
        ExpertCheckpointError,
        match=r"experts\.up_proj: shape \[4, 3, 6\]: dim 0 must be the 5 experts",
    ):
        convert_hf_to_native(stacked, n_experts=E + 1, gated=False)
    # A gated (gate_up_proj) checkpoint for relu2 experts: up_proj is missing.
    gated = {
        f"{P}experts.gate_up_proj": torch.zeros(E, 2 * F, D),
        f"{P}experts.down_proj": torch.zeros(E, D, F),
    }
    with pytest.raises(
        ExpertCheckpointError, match=r"missing \(1\): \['model.layers.1.mixer.experts.up_proj'\]"
    ):
        convert_hf_to_native(gated, n_experts=E, gated=False)


def test_transformers_module_state_dict_round_trip():
    transformers = pytest.importorskip("transformers")
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    config = transformers.NemotronHConfig(
        hidden_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=4,
        moe_shared_expert_intermediate_size=4,
        mlp_hidden_act="relu2",
    )
    block = NemotronHMoE(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    sd = {"backbone.layers.0.mixer." + k: v for k, v in block.state_dict().items()}
    native = convert_hf_to_native(sd, n_experts=4, gated=False)
    assert "backbone.layers.0.mixer.experts.gate_and_up_projs" in native
    _assert_same(convert_native_to_hf(native, gated=False, layout="stacked"), sd)
