"""Pin the public names of `am_moe` and check each one resolves to its defining module."""

import importlib
import subprocess
import sys

import am_moe

EXPECTED = [
    "ACTIVATIONS",
    "EXPERT_ACTIVATIONS",
    "EXPERT_IMPLS",
    "HF_LAYOUTS",
    "SCORE_FUNCS",
    "SHARED_EXPERT_ACTIVATIONS",
    "AllToAllDispatcher",
    "DeepEPDispatcher",
    "DispatchStats",
    "ExpertCheckpointError",
    "FakeBalancedGate",
    "Gate",
    "GroupedExperts",
    "HybridEPDispatcher",
    "LocalDispatcher",
    "MLP",
    "MoE",
    "MoEConfig",
    "MoEFSDPSyncMixin",
    "TokenDispatcher",
    "UCCLEPDispatcher",
    "apply_activation",
    "apply_ep",
    "build_dispatcher",
    "checkpoint_blocks",
    "convert_hf_to_native",
    "convert_native_to_hf",
    "hf_to_native_experts",
    "is_checkpointed",
    "is_gated",
    "iter_fsdp_modules",
    "local_expert_range",
    "native_to_hf_experts",
    "parallelize_model",
    "relu2",
    "run_experts",
    "uncheckpoint_blocks",
    "unwrap_checkpointed",
]

MODULES = (
    "config",
    "gate",
    "experts",
    "layers",
    "dispatch",
    "parallelizer",
    "fsdp_mixin",
    "state_dict",
    "activation_checkpointing",
)


def test_all_is_pinned():
    assert am_moe.__all__ == sorted(EXPECTED)


def test_every_name_resolves_to_its_module_object():
    for name in EXPECTED:
        owner = next(
            importlib.import_module(f"am_moe.{m}")
            for m in MODULES
            if name in importlib.import_module(f"am_moe.{m}").__all__
        )
        assert getattr(am_moe, name) is getattr(owner, name), name


def test_every_module_public_name_is_reexported():
    union = set()
    for mod in MODULES:
        union |= set(importlib.import_module(f"am_moe.{mod}").__all__)
    assert union == set(EXPECTED)


def test_unknown_name_raises():
    try:
        am_moe.NotAThing  # noqa: B018
    except AttributeError as err:
        assert "NotAThing" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_light():
    code = (
        "import sys, am_moe; "
        "heavy = [m for m in ('torch.distributed.fsdp', 'transformers', 'am_moe.parallelizer') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
