"""Hugging Face format checkpoints (config.json + safetensors) for native ``nn.Module`` models.

``HFCheckpointingMixin`` gives a model ``save_pretrained`` / ``from_pretrained`` that read and
write exactly what transformers reads and writes, so checkpoints move freely between the two.
The model may keep its own parameter layout in memory: an optional ``state_dict_adapter``
(``to_hf(state_dict)`` / ``from_hf(hf_state_dict, device_mesh=None)``) converts at the file
boundary.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from am_utils.init import init_empty_weights

logger = logging.getLogger(__name__)

__all__ = ["CheckpointLoadError", "HFCheckpointingMixin", "parse_shard_size", "read_hf_state_dict"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# Files of a checkpoint, in the order the loader looks for them: (file, is_index).
_CHECKPOINT_FILES = (
    (SAFE_INDEX_NAME, True),
    (SAFE_WEIGHTS_NAME, False),
    (BIN_INDEX_NAME, True),
    (BIN_WEIGHTS_NAME, False),
)
_STALE_WEIGHTS = re.compile(
    r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin"
    r"|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json)$"
)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


class CheckpointLoadError(ValueError):
    """A checkpoint does not match the model: lists missing, unexpected and mismatched keys."""


def parse_shard_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string like ``"5GB"``, ``"10MB"``, ``"1GiB"``.

    Decimal units (KB, MB, GB, TB) are powers of 1000 and binary ones (KiB, MiB, GiB, TiB)
    powers of 1024, case-insensitive; as in transformers, a decimal unit written with a
    lower-case final ``b`` (``"5Gb"``) means bits.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    unit = match.group(2).upper() if match else ""
    if match is None or (unit and unit not in _SIZE_UNITS) or int(match.group(1)) <= 0:
        raise ValueError(
            f"max_shard_size must be a positive int or a string like '5GB' with a unit in "
            f"{sorted(_SIZE_UNITS)}, got {size!r}"
        )
    n_bytes = int(match.group(1)) * _SIZE_UNITS.get(unit, 1)
    is_bits = unit in ("KB", "MB", "GB", "TB") and match.group(2).endswith("b")
    return max(1, n_bytes // 8) if is_bits else n_bytes


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views (its local shard for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if local.numel() == 0:  # empty tensors may all report data_ptr 0
        return ("empty", id(tensor))
    return (
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        tuple(local.shape),
        local.stride(),
        local.dtype,
    )


def _gather_full(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain CPU tensors for a state dict; DTensors are gathered once per shared storage so
    tied entries stay aliases (the gather is a collective: every rank must call it)."""
    gathered: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        if tensor.is_meta:
            raise ValueError(f"Cannot save {name!r}: it is on the meta device (never materialized)")
        key = _storage_key(tensor)
        if key not in gathered:
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            gathered[key] = full.detach().cpu()
        out[name] = gathered[key]
    return out


def _match_any(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def _is_tie_target(name: str, tied: Mapping[str, str]) -> bool:
    return name in tied or any(re.fullmatch(t, name) for t in tied)


def _tied_pairs(model) -> dict[str, str]:
    """``{target: source}`` of the model's declared ties, when tying is on in its config."""
    config = getattr(model, "config", None)
    tie = getattr(config, "tie_word_embeddings", None)
    if tie is None and hasattr(config, "get_text_config"):
        tie = getattr(config.get_text_config(), "tie_word_embeddings", False)
    declared = getattr(model, "_tied_weights_keys", None) or {}
    if not tie:
        return {}
    if isinstance(declared, Mapping):
        return dict(declared)
    return {name: "" for name in declared}


def _drop_tied_duplicates(hf_sd: dict, tied: dict[str, str]) -> dict:
    """Write each storage once: of entries sharing memory keep the first non-tie-target one;
    a declared tie target equal to its source is dropped even when it is a copy."""
    by_storage: dict[tuple, list[str]] = {}
    for name, tensor in hf_sd.items():
        by_storage.setdefault(_storage_key(tensor), []).append(name)
    dropped = set()
    for names in by_storage.values():
        if len(names) > 1:
            keep = next((n for n in names if not _is_tie_target(n, tied)), names[0])
            dropped.update(n for n in names if n != keep)
    for target, source in tied.items():
        if target in hf_sd and source in hf_sd and target not in dropped:
            if torch.equal(hf_sd[target], hf_sd[source]):
                dropped.add(target)
    if dropped:
        logger.info("Not writing tied duplicates %s", sorted(dropped))
    return {k: v for k, v in hf_sd.items() if k not in dropped}


def _plan_shards(hf_sd: dict, max_bytes: int) -> list[list[str]]:
    """Greedy split in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, tensor in hf_sd.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and current + size > max_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def _remove_stale_weights(directory: Path, keep: set[str]) -> None:
    for path in directory.iterdir():
        if path.is_file() and _STALE_WEIGHTS.match(path.name) and path.name not in keep:
            path.unlink()


def _write_shards(directory: Path, hf_sd: dict, max_bytes: int, safe: bool) -> list[str]:
    shards = _plan_shards(hf_sd, max_bytes)
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    if len(shards) == 1:
        file_names = [f"{stem}.{ext}"]
    else:
        file_names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    storage_use: dict[int, int] = {}
    for tensor in hf_sd.values():
        ptr = tensor.untyped_storage().data_ptr()
        storage_use[ptr] = storage_use.get(ptr, 0) + 1
    for file_name, names in zip(file_names, shards, strict=True):
        tensors = {}
        for n in names:
            tensor = hf_sd[n].contiguous()
            # Views into one storage (e.g. an adapter splitting a fused weight) are copied:
            # safetensors refuses tensors that share memory.
            if storage_use[hf_sd[n].untyped_storage().data_ptr()] > 1:
                tensor = tensor.clone()
            tensors[n] = tensor
        if safe:
            save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / file_name)
    written = list(file_names)
    if len(shards) > 1:
        index_name = SAFE_INDEX_NAME if safe else BIN_INDEX_NAME
        weight_map = {n: f for f, names in zip(file_names, shards, strict=True) for n in names}
        index = {
            "metadata": {
                "total_size": sum(t.numel() * t.element_size() for t in hf_sd.values()),
                "total_parameters": sum(t.numel() for t in hf_sd.values()),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        (directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_name)
    return written


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a local HF checkpoint directory onto the CPU.

    Looks for, in order: ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin``.
    """
    directory = Path(directory)
    for file_name, is_index in _CHECKPOINT_FILES:
        path = directory / file_name
        if not path.is_file():
            continue
        if not is_index:
            return _load_file(path)
        weight_map = json.loads(path.read_text())["weight_map"]
        state_dict: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(_load_file(directory / shard))
        return state_dict
    raise FileNotFoundError(
        f"No weights in {str(directory)!r}: looked for {[f for f, _ in _CHECKPOINT_FILES]}"
    )


def _resolve_local_dir(path) -> Path:
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(
            f"{str(path)!r} is not an existing local directory: from_pretrained loads only "
            "local directories (no Hub downloads); fetch the checkpoint first, e.g. with "
            "huggingface_hub.snapshot_download"
        )
    return Path(path)


def _resolve_dtype(dtype, config) -> torch.dtype | None:
    """``None`` keeps the construction dtype; ``"auto"`` takes the config's dtype."""
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(
            f"dtype must be a torch.dtype, a name such as 'bfloat16', 'auto' or None; got {dtype!r}"
        )
    return resolved


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None or not dtype.is_floating_point:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """Map each state-dict name to every name bound to the same parameter/buffer object."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(tensor), []).append(name)
    for name, tensor in model.named_buffers(remove_duplicate=False):
        groups.setdefault(id(tensor), []).append(name)
    return {name: names for names in groups.values() for name in names}


def _check_keys(
    model: nn.Module, state_dict: dict, expected: dict
) -> tuple[dict[str, list], list[str]]:
    """Sort the differences between checkpoint and model into missing/unexpected/mismatched,
    after dropping keys the model declares ignorable or optional. Also returns the absent
    optional keys."""
    aliases = _alias_groups(model)
    ignore = getattr(model, "_checkpoint_ignore_unexpected_keys", ()) or ()
    optional = getattr(model, "_checkpoint_optional_keys", ()) or ()
    unexpected = [k for k in state_dict if k not in expected]
    ignored = [k for k in unexpected if _match_any(k, ignore)]
    if ignored:
        logger.info("Ignoring checkpoint keys declared unused by the model: %s", ignored)
    missing, optional_absent = [], []
    for name in expected:
        if any(alias in state_dict for alias in aliases.get(name, [name])):
            continue
        if _match_any(name, optional):
            logger.info("Optional key %r absent from the checkpoint; keeping its own value", name)
            optional_absent.append(name)
            continue
        missing.append(name)
    mismatched = [
        (k, tuple(expected[k].shape), tuple(state_dict[k].shape))
        for k in state_dict
        if k in expected and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    report = {
        "missing": missing,
        "unexpected": [k for k in unexpected if k not in ignored],
        "mismatched": mismatched,
    }
    return report, optional_absent


def _format_key_report(model_name: str, report: dict[str, list]) -> str:
    lines = [f"Checkpoint does not match {model_name}:"]
    if report["missing"]:
        lines.append(f"  missing keys ({len(report['missing'])}): {report['missing']}")
    if report["unexpected"]:
        lines.append(f"  unexpected keys ({len(report['unexpected'])}): {report['unexpected']}")
    for name, want, got in report["mismatched"]:
        lines.append(
            f"  shape mismatch for {name}: model expects {list(want)}, checkpoint has {list(got)}"
        )
    lines.append(
        "Declare intentionally absent keys in _checkpoint_optional_keys and intentionally "
        "unused ones in _checkpoint_ignore_unexpected_keys (lists of regex)."
    )
    return "\n".join(lines)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def _set_tensor(model: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Bind ``value`` to every alias in ``names``, as a Parameter where the slot holds one."""
    owner, leaf = _owner(model, names[0])
    old = owner._parameters.get(leaf) if leaf in owner._parameters else None
    if old is not None:
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    for name in names:
        owner, leaf = _owner(model, name)
        slots = owner._parameters if leaf in owner._parameters else owner._buffers
        slots[leaf] = value


def _init_missing(model: nn.Module, names: list[str], device: torch.device) -> None:
    """Materialize parameters the checkpoint lacks (optional ones, or any with strict=False)
    with the module's own init (``reset_parameters`` or the model's ``_init_weights``), else
    zeros. Tensors that are not on the meta device (buffers) keep their value."""
    for name in names:
        owner, leaf = _owner(model, name)
        tensor = getattr(owner, leaf)
        if not tensor.is_meta:
            continue
        empty = torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)
        _set_tensor(model, _alias_groups(model).get(name, [name]), empty)
        init = getattr(owner, "reset_parameters", None)
        with torch.no_grad():
            if callable(init):
                init()
            elif callable(getattr(model, "_init_weights", None)):
                model._init_weights(owner)
        logger.warning("%r is not in the checkpoint; initialized it afresh", name)


def _load_into(model: nn.Module, state_dict: dict, strict: bool, device: torch.device) -> None:
    expected = model.state_dict(keep_vars=True)
    report, optional_absent = _check_keys(model, state_dict, expected)
    message = _format_key_report(type(model).__name__, report)
    if any(report.values()):
        if strict:
            raise CheckpointLoadError(message)
        logger.warning("%s", message)
    bad = {name for name, _, _ in report["mismatched"]}
    _init_missing(model, optional_absent + report["missing"] + sorted(bad), device)
    aliases = _alias_groups(model)
    for name, value in state_dict.items():
        if name not in expected or name in bad:
            continue
        target = expected[name]
        if value.is_floating_point() and target.is_floating_point():
            value = value.to(dtype=target.dtype)
        _set_tensor(model, aliases.get(name, [name]), value.to(device))
    # Buffers the checkpoint does not hold (computed ones, e.g. RoPE frequencies) were built
    # outside the meta context; only their device may need to change.
    for name, buffer in model.named_buffers():
        if buffer is not None and not buffer.is_meta and buffer.device != device:
            owner, leaf = _owner(model, name)
            owner._buffers[leaf] = buffer.to(device)
    leftover = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if leftover:
        raise CheckpointLoadError(f"Still on the meta device after loading: {leftover}")


def _config_to_save(config, hf_sd: dict):
    """A copy of ``config`` whose ``dtype`` names the dtype of the written weights (the first
    floating tensor, as transformers records it), so ``dtype="auto"`` loads reproduce it."""
    floating = next((t.dtype for t in hf_sd.values() if t.is_floating_point()), None)
    config = copy.deepcopy(config)
    if floating is not None:
        config.dtype = floating
    return config


def _check_save_kwargs(kwargs: dict) -> bool | None:
    if kwargs.get("push_to_hub"):
        raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported: local only")
    unknown = sorted(set(kwargs) - {"is_main_process", "push_to_hub"})
    if unknown:
        raise TypeError(
            f"save_pretrained got unexpected keyword arguments {unknown}; accepted extra "
            "keywords: ['is_main_process', 'push_to_hub' (False only)]"
        )
    return kwargs.get("is_main_process")


def _is_main_process(is_main_process: bool | None) -> bool:
    if is_main_process is not None:
        return is_main_process
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class HFCheckpointingMixin:
    """``save_pretrained`` / ``from_pretrained`` in Hugging Face format for an ``nn.Module``.

    The model must have ``self.config`` (a transformers ``PretrainedConfig``) and may have:

    - ``self.state_dict_adapter`` with ``to_hf(state_dict) -> dict`` and
      ``from_hf(hf_state_dict, device_mesh=None) -> dict``: files use HF key names and layout,
      memory uses the model's own;
    - ``config_class``: the config class ``from_pretrained`` reads (default ``AutoConfig``);
    - ``_tied_weights_keys``: ``{target: source}`` (or a list of targets) in HF key names;
      with ``config.tie_word_embeddings`` the targets are not written, as transformers does;
    - ``_checkpoint_ignore_unexpected_keys``: regexes (``re.search``) of checkpoint keys to
      drop with an info log, e.g. the dead k/v weights of Gemma 4 KV-shared layers;
    - ``_checkpoint_optional_keys``: regexes of model keys a checkpoint may lack, e.g.
      persistent buffers recomputed at construction; they keep their constructed value.
    """

    _checkpoint_ignore_unexpected_keys: tuple[str, ...] | list[str] = ()
    _checkpoint_optional_keys: tuple[str, ...] | list[str] = ()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        **kwargs,
    ) -> None:
        """Write ``config.json``, ``generation_config.json`` (if the model has one) and the
        weights, sharded as ``model-0000i-of-0000N.safetensors`` plus
        ``model.safetensors.index.json`` above ``max_shard_size`` (``pytorch_model*.bin``
        when ``safe_serialization=False``). DTensor weights are gathered first, so with a
        process group every rank must call this; only the main process (rank 0 unless
        ``is_main_process`` says otherwise) writes. Stale weight files are removed. Keyword
        ``is_main_process`` is accepted; ``push_to_hub=True`` is not supported.
        """
        is_main_process = _check_save_kwargs(kwargs)
        max_bytes = parse_shard_size(max_shard_size)
        full = _gather_full(self.state_dict() if state_dict is None else state_dict)
        adapter = getattr(self, "state_dict_adapter", None)
        hf_sd = dict(adapter.to_hf(full)) if adapter is not None else full
        hf_sd = _drop_tied_duplicates(hf_sd, _tied_pairs(self))
        if _is_main_process(is_main_process):
            directory = Path(save_directory)
            directory.mkdir(parents=True, exist_ok=True)
            _config_to_save(self.config, hf_sd).save_pretrained(directory)
            generation_config = getattr(self, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(directory)
            written = _write_shards(directory, hf_sd, max_bytes, safe_serialization)
            _remove_stale_weights(directory, set(written))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config=None,
        torch_dtype=None,
        dtype=None,
        strict: bool = True,
        device: torch.device | str | None = None,
        **kwargs,
    ):
        """Build the model from a local HF checkpoint directory (ours or transformers').

        The config comes from ``config`` or the directory (``cls.config_class``, else
        ``AutoConfig``). The model is constructed on the meta device (no allocation, no
        random init) with ``cls(config, *model_args, **kwargs)`` under ``dtype`` (alias
        ``torch_dtype``; ``"auto"`` reads the config, ``None`` keeps the default), and the
        checkpoint tensors are bound to it on ``device`` (default CPU) after
        ``state_dict_adapter.from_hf``. With ``strict`` any missing, unexpected or
        wrongly shaped key raises ``CheckpointLoadError`` naming them all; otherwise they
        are logged and missing parameters are initialized afresh. Returns the model in
        eval mode, as transformers does.
        """
        directory = _resolve_local_dir(pretrained_model_name_or_path)
        if config is None:
            config = _load_config(cls, directory)
        target_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if target_dtype is not None:
            config.dtype = target_dtype  # as transformers does: the config records the dtype
        with _default_dtype(target_dtype), init_empty_weights():
            model = cls(config, *model_args, **kwargs)
        state_dict = read_hf_state_dict(directory)
        adapter = getattr(model, "state_dict_adapter", None)
        if adapter is not None:
            state_dict = dict(adapter.from_hf(state_dict))
        _load_into(model, state_dict, strict, device)
        if getattr(model, "generation_config", None) is not None:
            _maybe_load_generation_config(model, directory)
        return model.eval()


def _load_config(cls, directory: Path):
    from transformers import AutoConfig, PretrainedConfig

    config_class = getattr(cls, "config_class", None)
    if isinstance(config_class, type) and issubclass(config_class, PretrainedConfig):
        return config_class.from_pretrained(directory)
    return AutoConfig.from_pretrained(directory)


def _maybe_load_generation_config(model, directory: Path) -> None:
    if not (directory / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(directory)
