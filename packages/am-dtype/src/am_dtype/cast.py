"""Dtype casting that keeps fp32 modules in fp32, exactly, sharded or not.

A model declares what must stay in full precision the way transformers
does: `_keep_in_fp32_modules` (hints) and `_keep_in_fp32_modules_strict`
(must). A keyword matches a tensor when it equals a run of whole
dot-separated segments of the tensor's qualified name, so "norm" matches
`model.norm.weight` and `layers.0.norm.bias` but not `layers.0.layernorm.weight`,
and "attn_hc.fn" names a single parameter.

Two facts shape the code:
- fp32 -> bf16 -> fp32 restores the dtype but not the values, so the
  tensors that must stay fp32 are snapshotted before a broad cast and
  copied back after it (`_snapshot_fp32_tensors` / `_restore_fp32_tensor_snapshots`).
- FSDP2 needs one dtype per parameter group and keeps its own reference to
  each sharded parameter's storage: a sharded parameter may only change
  dtype through `FSDPModule._apply` (i.e. `.to()` on its FSDP unit), and only
  a whole unit at a time. So on a sharded model strict fp32 modules (their
  own units) are cast back, while non-strict hints restore buffers only.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from am_dtype.dtypes import resolve_dtype

logger = logging.getLogger(__name__)

_FP32_ATTR = "_keep_in_fp32_modules"
_STRICT_FP32_ATTR = "_keep_in_fp32_modules_strict"


def _matches(name: str, keywords: Iterable[str]) -> bool:
    """True if some keyword is a run of whole dot-separated segments of `name`."""
    padded = f".{name}."
    return any(f".{kw}." in padded for kw in keywords)


def _collect_keywords(model: nn.Module, attrs: tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for module in model.modules():
        for attr in attrs:
            value = getattr(module, attr, None)
            if value is None:
                continue
            if isinstance(value, str):
                value = [value]
            items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
            for kw in items:
                if not isinstance(kw, str) or not kw.strip("."):
                    raise TypeError(
                        f"{type(module).__name__}.{attr} must hold non-empty module-name strings, "
                        f"got {kw!r}"
                    )
                seen.setdefault(kw.strip("."), None)
    return list(seen)


def _get_fp32_module_keywords(model: nn.Module) -> list[str]:
    """Collect module name patterns that must remain in fp32.

    Reads `_keep_in_fp32_modules` and `_keep_in_fp32_modules_strict` from the
    model and its submodules (as transformers aggregates them) and returns
    them de-duplicated, in first-seen order.
    """
    return _collect_keywords(model, (_FP32_ATTR, _STRICT_FP32_ATTR))


def _get_strict_fp32_module_keywords(model: nn.Module) -> list[str]:
    """Collect only the `_keep_in_fp32_modules_strict` patterns (de-duplicated)."""
    return _collect_keywords(model, (_STRICT_FP32_ATTR,))


def _has_dtensor_params(model: nn.Module) -> bool:
    """Check if any model parameter is a DTensor (FSDP2 sharded)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _local_tensors(
    model: nn.Module, kind: str
) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Yield (qualified name, owner, attribute name, tensor) for parameters or buffers."""
    for mod_name, module in model.named_modules():
        store = module._parameters if kind == "param" else module._buffers
        for attr, tensor in store.items():
            if tensor is not None:
                yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr, tensor


def _upcast_matching(model: nn.Module, keywords: list[str], kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        for name, module, attr, tensor in _local_tensors(model, kind):
            if not tensor.is_floating_point() or tensor.dtype == torch.float32:
                continue
            if not _matches(name, keywords):
                continue
            if kind == "buffer":
                module._buffers[attr] = tensor.float()
            elif isinstance(tensor, DTensor):
                raise TypeError(
                    f"parameter {name!r} is a DTensor; a sharded parameter cannot be re-typed "
                    "in place (FSDP2 keeps its own reference). Use cast_model_to_dtype, which "
                    "casts whole FSDP units, or put the module in its own fully_shard unit"
                )
            else:
                tensor.data = tensor.data.float()


def _restore_fp32_modules(model: nn.Module, fp32_keywords: list[str]) -> None:
    """Cast parameters and buffers matching `fp32_keywords` back to float32.

    Only for unsharded models (plain tensors): FSDP2 needs a uniform dtype per
    parameter group, so a DTensor parameter raises TypeError. Keywords may name
    modules ("norm") or single parameters ("attn_hc.fn").
    """
    _upcast_matching(model, fp32_keywords, ("param", "buffer"))


def _restore_fp32_buffers(model: nn.Module, fp32_keywords: list[str]) -> None:
    """Cast only matching buffers (not parameters) back to float32.

    Safe on FSDP2-sharded models: buffers are plain tensors FSDP2 does not manage.
    """
    _upcast_matching(model, fp32_keywords, ("buffer",))


def _snapshot_fp32_tensors(
    model: nn.Module, parameter_keywords: list[str], buffer_keywords: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clone fp32-preserved tensors before a broad dtype cast.

    fp32 -> bf16 -> fp32 restores the dtype but not the values; the clones
    (of the matching tensors that are fp32 now) let strict state such as a
    router correction bias be restored bit for bit.
    Returns (parameter snapshots, buffer snapshots) keyed by qualified name.
    """
    return (
        _clone_matching_fp32(model, "param", parameter_keywords),
        _clone_matching_fp32(model, "buffer", buffer_keywords),
    )


def _clone_matching_fp32(
    model: nn.Module, kind: str, keywords: list[str]
) -> dict[str, torch.Tensor]:
    snap: dict[str, torch.Tensor] = {}
    if keywords:
        for name, _, _, tensor in _local_tensors(model, kind):
            if tensor.dtype == torch.float32 and _matches(name, keywords):
                snap.setdefault(name, tensor.detach().clone())
    return snap


def _restore_into(name: str, module: nn.Module, attr: str, snap: torch.Tensor, kind: str) -> None:
    current = module._parameters[attr] if kind == "param" else module._buffers[attr]
    if current.dtype == snap.dtype and current.shape == snap.shape:
        # In place: a sharded parameter's storage is also referenced by FSDP2.
        with torch.no_grad():
            current.copy_(snap)
    elif kind == "buffer":
        module._buffers[attr] = snap.to(current.device)
    elif isinstance(current, DTensor):
        raise TypeError(
            f"cannot restore sharded parameter {name!r}: it is {current.dtype}, the snapshot is "
            f"{snap.dtype}; cast its FSDP unit to {snap.dtype} first"
        )
    else:
        current.data = snap.to(current.device)


def _restore_fp32_tensor_snapshots(
    model: nn.Module,
    parameter_snapshots: dict[str, torch.Tensor],
    buffer_snapshots: dict[str, torch.Tensor],
) -> None:
    """Restore fp32-preserved tensors from pre-cast snapshots (values and dtype)."""
    for snaps, kind in ((parameter_snapshots, "param"), (buffer_snapshots, "buffer")):
        if not snaps:
            continue
        for name, module, attr, _ in _local_tensors(model, kind):
            if name in snaps:
                _restore_into(name, module, attr, snaps[name], kind)


def _topmost_matching_modules(model: nn.Module, keywords: list[str]) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if (
            name
            and _matches(name, keywords)
            and not any(name.startswith(f"{outer}.") for outer, _ in found)
        ):
            found.append((name, module))
    return found


def _restore_strict_fp32_units(model: nn.Module, strict_keywords: list[str]) -> None:
    """Sharded model: cast each strict fp32 module (its own FSDP unit) back to fp32."""
    from torch.distributed.fsdp import FSDPModule

    covered: list[str] = []
    for name, module in _topmost_matching_modules(model, strict_keywords):
        if not isinstance(module, FSDPModule) and _has_dtensor_params(module):
            raise ValueError(
                f"strict fp32 module {name!r} is sharded but is not its own FSDP unit, so its "
                "parameters share a group with lower-precision ones; call fully_shard on it "
                "separately before sharding its parent"
            )
        module.to(torch.float32)
        covered.append(name)
    # Keywords that name single parameters outside any matched module.
    for name, _, _, tensor in _local_tensors(model, "param"):
        if any(name.startswith(f"{c}.") for c in covered) or not _matches(name, strict_keywords):
            continue
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            if isinstance(tensor, DTensor):
                raise ValueError(
                    f"strict fp32 parameter {name!r} is sharded inside a lower-precision FSDP "
                    "unit; move it to a holder module with its own fully_shard unit (and pass "
                    "that module in skip_modules)"
                )
            tensor.data = tensor.data.float()


def enforce_strict_fp32(model: nn.Module) -> nn.Module:
    """Make every tensor named by `_keep_in_fp32_modules_strict` fp32 now; returns the model.

    For construction: a model built under a lower default dtype (or with `dtype=bf16`)
    still holds its strict state, such as a router's `e_score_correction_bias`, in fp32,
    whose small offsets would round away in bf16. Buffers are re-created in fp32; plain
    parameters are re-typed in place. A sharded (DTensor) parameter raises TypeError:
    after sharding, use `cast_model_to_dtype`, which casts whole FSDP units.
    """
    _restore_fp32_modules(model, _get_strict_fp32_module_keywords(model))
    return model


@contextlib.contextmanager
def _detached(model: nn.Module, skip_modules: tuple[str, ...]) -> Iterator[None]:
    """Temporarily remove the named submodules, at any depth, so nothing visits them.

    A name matches a submodule the way fp32 keywords do (a run of whole dot-separated
    segments of its qualified name), so "_fp32_params" finds the holder of every block and
    "layers.0.mlp" one module; only the outermost match of a subtree is detached. Each is
    re-attached to its parent, the same object, when the block ends, even on error.
    """
    found = _topmost_matching_modules(model, list(skip_modules)) if skip_modules else []
    names = [n for n, _ in model.named_modules() if n]
    missing = [kw for kw in skip_modules if not any(_matches(n, [kw]) for n in names)]
    if missing:
        raise ValueError(
            f"skip_modules {missing} match no submodule of {type(model).__name__} at any depth "
            "(a name matches whole dot-separated components of a submodule's path); accepted: "
            f"{sorted(n for n, m in model._modules.items() if m is not None)} or names inside them"
        )
    saved = []
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        saved.append((parent, attr, module))
        parent._modules[attr] = None
    try:
        yield
    finally:
        for parent, attr, module in saved:
            parent._modules[attr] = module


def cast_model_to_dtype(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    skip_modules: tuple[str, ...] = (),
) -> None:
    """Cast the model to `dtype`, keeping its fp32 modules in fp32 with their exact values.

    Respects `_keep_in_fp32_modules` / `_keep_in_fp32_modules_strict`. On an
    unsharded model every matching parameter and buffer is kept fp32. On an
    FSDP2-sharded model (DTensor parameters) strict fp32 modules -- expected to
    be their own uniform fp32 FSDP units -- are cast back to fp32, while
    non-strict hints keep only their buffers fp32, since their parameters may
    share a unit with lower-precision ones. `skip_modules` names submodules, found
    at any depth (e.g. "_fp32_params" matches one holder per block), that are
    detached during the cast, left entirely untouched and re-attached (each must
    be its own dtype-uniform FSDP unit when sharded).
    """
    dtype = resolve_dtype(dtype, name="cast_model_to_dtype dtype")
    all_keywords = _get_fp32_module_keywords(model)
    strict_keywords = _get_strict_fp32_module_keywords(model)
    with _detached(model, tuple(skip_modules)):
        sharded = _has_dtensor_params(model)
        param_keywords = strict_keywords if sharded else all_keywords
        param_snaps, buffer_snaps = _snapshot_fp32_tensors(model, param_keywords, all_keywords)
        model.to(dtype)
        if sharded:
            _restore_strict_fp32_units(model, strict_keywords)
            _restore_fp32_buffers(model, all_keywords)
        else:
            _restore_fp32_modules(model, all_keywords)
        _restore_fp32_tensor_snapshots(model, param_snaps, buffer_snaps)


def _is_fully_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def cast_frozen_modules_to_compute_dtype(
    model: nn.Module, compute_dtype: torch.dtype | None
) -> None:
    """Cast the floating-point tensors of frozen submodules to `compute_dtype`.

    With fp32 master weights and bf16 compute, a fully frozen submodule (say
    a frozen vision tower) would otherwise feed fp32 activations into bf16
    trainable modules. For each maximal fully-frozen submodule (one with
    parameters, none trainable): plain parameters are cast (sharded DTensor
    parameters are left to FSDP's all-gather, which already yields the compute
    dtype), and buffers are always cast since FSDP2 never touches them.
    Tensors matching the fp32 keep lists stay fp32. No-op for
    `compute_dtype=None`.
    """
    if compute_dtype is None:
        return
    compute_dtype = resolve_dtype(compute_dtype, name="compute_dtype")
    keep = _get_fp32_module_keywords(model)
    frozen_roots: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{r}.") for r in frozen_roots) or "" in frozen_roots:
            continue
        if _is_fully_frozen(module):
            frozen_roots.append(name)
            _cast_frozen(module, name, compute_dtype, keep)


def _cast_frozen(root: nn.Module, prefix: str, dtype: torch.dtype, keep: list[str]) -> None:
    for kind in ("param", "buffer"):
        for name, module, attr, tensor in _local_tensors(root, kind):
            full = f"{prefix}.{name}" if prefix else name
            if not tensor.is_floating_point() or tensor.dtype == dtype or _matches(full, keep):
                continue
            if kind == "buffer":
                module._buffers[attr] = tensor.to(dtype)
            elif not isinstance(tensor, DTensor):
                tensor.data = tensor.data.to(dtype)


def _dominant_float_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype holding most parameter elements (buffers if no parameters)."""
    counts: Counter[torch.dtype] = Counter()
    for tensors in (model.parameters(), model.buffers()):
        for t in tensors:
            if t.is_floating_point():
                counts[t.dtype] += t.numel()
        if counts:
            break
    return counts.most_common(1)[0][0] if counts else torch.float32


@contextlib.contextmanager
def yield_fp32_model(
    model: nn.Module, restore_dtype: torch.dtype | None = None
) -> Iterator[nn.Module]:
    """Run a block with the model temporarily in fp32, then cast it to `restore_dtype`.

    Meant for from-scratch weight initialization: sampling `normal_` /
    `trunc_normal_` directly in bf16 quantizes small init magnitudes and
    biases the init statistics, which in deep residual stacks shows up as
    huge first-step gradients; sampling in fp32 and rounding once does not.
    `restore_dtype` defaults to the model's pre-context floating dtype. Both
    casts are whole-model, so FSDP2 units stay dtype-uniform; fp32 keep lists
    are honoured on exit through `cast_model_to_dtype` (values kept exact).
    The model is restored even if the block raises.
    """
    target = resolve_dtype(restore_dtype, name="restore_dtype") or _dominant_float_dtype(model)
    model.to(torch.float32)
    try:
        yield model
    finally:
        if target != torch.float32:
            cast_model_to_dtype(model, target)


def cast_mixed_dtype_params_to_bf16(model: nn.Module) -> nn.Module:
    """Cast fp32 parameters and buffers to bf16 for FSDP2 compatibility.

    FSDP2 needs one dtype per parameter group; a checkpoint that mixes bf16
    weights with a few fp32 tensors cannot be sharded as is. Only fp32 tensors
    change (other dtypes, integers and DTensors are left alone). Returns the model.
    """
    n_cast = 0
    for kind in ("param", "buffer"):
        for _, module, attr, tensor in _local_tensors(model, kind):
            if tensor.dtype != torch.float32 or isinstance(tensor, DTensor):
                continue
            if kind == "buffer":
                module._buffers[attr] = tensor.to(torch.bfloat16)
            else:
                tensor.data = tensor.data.to(torch.bfloat16)
            n_cast += 1
    if n_cast:
        logger.info("cast %d fp32 parameters/buffers to bf16", n_cast)
    return model
