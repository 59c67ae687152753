"""Hugging Face format checkpoints (config.json + safetensors) for native ``nn.Module`` models.

``HFCheckpointingMixin`` gives a model ``save_pretrained`` / ``from_pretrained`` that read and
write exactly what transformers reads and writes, so checkpoints move freely between the two.
The model may keep its own parameter layout in memory: an optional ``state_dict_adapter``
(``to_hf(state_dict)`` / ``from_hf(hf_state_dict, device_mesh=None)``) converts at the file
boundary.

``save_pretrained`` is atomic: at every instant the directory holds either the complete
previous checkpoint or the complete new one; an exception or a killed process part-way leaves
the previous one loadable and unchanged, and never a file it did not replace is deleted. The
protocol (staging directory, one-rename commit, idempotent roll forward) is described in
``am_utils.checkpoint_files``; ``from_pretrained`` reads through it (a committed but
unfinished save loads as the new checkpoint, leftovers of a killed one are ignored).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from am_dtype.dtensor import full_tensor, to_local
from am_dtype.dtypes import resolve_dtype
from am_utils.checkpoint_files import (
    CONFIG_NAME,
    CheckpointLoadError,
    read_hf_state_dict,
    resolve_checkpoint_files,
    write_checkpoint,
)
from am_utils.init import init_empty_weights

logger = logging.getLogger(__name__)

__all__ = ["CheckpointLoadError", "HFCheckpointingMixin", "parse_shard_size", "read_hf_state_dict"]

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


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
    local = to_local(tensor)
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
            full = full_tensor(tensor)
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
    return resolve_dtype(dtype, name="from_pretrained dtype")


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
        "tied": _conflicting_aliases(state_dict, aliases),
    }
    return report, optional_absent


def _conflicting_aliases(state_dict: dict, aliases: dict[str, list[str]]) -> list[list[str]]:
    """Groups of checkpoint keys bound to one model tensor (tied weights) whose values differ:
    only one of them could be used."""
    conflicts, seen = [], set()
    for names in aliases.values():
        present = [n for n in names if n in state_dict]
        if len(present) < 2 or present[0] in seen:
            continue
        seen.update(present)
        first = state_dict[present[0]]
        if any(
            state_dict[n].shape != first.shape or not torch.equal(state_dict[n], first)
            for n in present[1:]
        ):
            conflicts.append(present)
    return conflicts


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
    for names in report["tied"]:
        lines.append(
            f"  tied keys with different values (the model ties them, so one would be "
            f"dropped): {names}"
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


def _reinitialize(model: nn.Module, owner: nn.Module) -> bool:
    """Run the module's own init (``reset_parameters``, am's ``init_weights``) or the model's
    ``_init_weights(module)``; False when there is none."""
    for hook in ("reset_parameters", "init_weights"):
        init = getattr(owner, hook, None)
        if callable(init):
            init()
            return True
    if callable(getattr(model, "_init_weights", None)):
        model._init_weights(owner)
        return True
    return False


def _init_missing(model: nn.Module, names: list[str], device: torch.device) -> None:
    """Materialize parameters the checkpoint lacks (optional ones, or any with strict=False)
    with the module's own init (``reset_parameters`` / ``init_weights``, or the model's
    ``_init_weights``), else zeros. Tensors that are not on the meta device (buffers) keep
    their value. Checkpoint tensors are bound afterwards, so an init that also touches
    loaded siblings does not overwrite them."""
    for name in names:
        owner, leaf = _owner(model, name)
        tensor = getattr(owner, leaf)
        if not tensor.is_meta:
            continue
        empty = torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)
        _set_tensor(model, _alias_groups(model).get(name, [name]), empty)
        with torch.no_grad():
            initialized = _reinitialize(model, owner)
        how = "initialized it afresh" if initialized else "no init found: it holds zeros"
        logger.warning("%r is not in the checkpoint; %s", name, how)


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
    - ``_checkpoint_model_types``: the ``model_type`` values ``from_pretrained`` accepts in
      ``config.json`` (default: ``config_class.model_type`` when set; else any);
    - ``_tied_weights_keys``: ``{target: source}`` (or a list of targets) in HF key names;
      with ``config.tie_word_embeddings`` the targets are not written, as transformers does;
    - ``_checkpoint_ignore_unexpected_keys``: regexes (``re.search``) of checkpoint keys to
      drop with an info log, e.g. the dead k/v weights of Gemma 4 KV-shared layers;
    - ``_checkpoint_optional_keys``: regexes of model keys a checkpoint may lack, e.g.
      persistent buffers recomputed at construction; they keep their constructed value.
    """

    _checkpoint_ignore_unexpected_keys: tuple[str, ...] | list[str] = ()
    _checkpoint_optional_keys: tuple[str, ...] | list[str] = ()
    _checkpoint_model_types: tuple[str, ...] | list[str] = ()

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
        ``is_main_process`` says otherwise) writes. Keyword ``is_main_process`` is accepted;
        ``push_to_hub=True`` is not supported.

        Atomic (see ``am_utils.checkpoint_files``): files are staged in
        ``.am-save-<hex>/`` and switched in after a one-rename commit, so an exception or a
        killed process leaves the previous checkpoint loadable and unchanged. Only the files
        of the replaced checkpoint are removed (its weights entry and the shards its index
        lists); other files (README.md, ``pytorch_model.bin``, foreign shards) are kept.
        """
        is_main_process = _check_save_kwargs(kwargs)
        max_bytes = parse_shard_size(max_shard_size)
        full = _gather_full(self.state_dict() if state_dict is None else state_dict)
        adapter = getattr(self, "state_dict_adapter", None)
        hf_sd = dict(adapter.to_hf(full)) if adapter is not None else full
        hf_sd = _drop_tied_duplicates(hf_sd, _tied_pairs(self))
        if _is_main_process(is_main_process):
            config = _config_to_save(self.config, hf_sd)
            generation_config = getattr(self, "generation_config", None)

            def write_metadata(stage: Path) -> None:
                config.save_pretrained(stage)
                if generation_config is not None:
                    generation_config.save_pretrained(stage)

            write_checkpoint(
                save_directory,
                hf_sd,
                max_bytes=max_bytes,
                safe=safe_serialization,
                write_metadata=write_metadata,
            )
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
        ``AutoConfig``); a missing ``config.json`` raises ``FileNotFoundError``, one that is
        not JSON or of a model type the class does not load (``_checkpoint_model_types``)
        raises ``CheckpointLoadError`` naming the file, as does a corrupt weights file or
        index. The model is constructed on the meta device (no allocation, no
        random init) with ``cls(config, *model_args, **kwargs)`` under ``dtype`` (alias
        ``torch_dtype``; ``"auto"`` reads the config, ``None`` keeps the default), and the
        checkpoint tensors are bound to it on ``device`` (default CPU) after
        ``state_dict_adapter.from_hf`` (passed ``strict`` when it takes it; a KeyError or
        ValueError it raises becomes a ``CheckpointLoadError``). With ``strict`` any
        missing, unexpected or wrongly shaped key, or tied keys holding different values,
        raises ``CheckpointLoadError`` naming them all; otherwise they are logged,
        unexpected tensors are dropped and missing or mis-shaped parameters are
        initialized afresh (the module's ``reset_parameters`` / ``init_weights``, or the
        model's ``_init_weights``). Returns the model in eval mode, as transformers does.
        """
        directory = _resolve_local_dir(pretrained_model_name_or_path)
        if config is None:
            config = _load_config(cls, directory)
        _check_config_type(cls, config, directory)
        target_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if target_dtype is not None:
            config.dtype = target_dtype  # as transformers does: the config records the dtype
        with _default_dtype(target_dtype), init_empty_weights():
            model = cls(config, *model_args, **kwargs)
        state_dict = read_hf_state_dict(directory)
        adapter = getattr(model, "state_dict_adapter", None)
        if adapter is not None:
            state_dict = _adapter_from_hf(adapter, state_dict, strict, directory)
        _load_into(model, state_dict, strict, device)
        if getattr(model, "generation_config", None) is not None:
            _maybe_load_generation_config(model, directory)
        return model.eval()


def _accepts_keyword(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _adapter_from_hf(adapter, state_dict: dict, strict: bool, directory: Path) -> dict:
    """``adapter.from_hf`` (given ``strict`` when it takes it); a conversion that fails on the
    checkpoint's tensors (a KeyError/ValueError naming them) is a ``CheckpointLoadError``."""
    kwargs = {"strict": strict} if _accepts_keyword(adapter.from_hf, "strict") else {}
    try:
        return dict(adapter.from_hf(state_dict, **kwargs))
    except CheckpointLoadError:
        raise
    except (KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise CheckpointLoadError(
            f"The checkpoint in {directory} does not fit {type(adapter).__name__}: {message}"
        ) from err


def _accepted_model_types(cls) -> tuple[str, ...]:
    declared = getattr(cls, "_checkpoint_model_types", None)
    if declared:
        return tuple(declared)
    model_type = getattr(getattr(cls, "config_class", None), "model_type", "")
    return (model_type,) if isinstance(model_type, str) and model_type else ()


def _raw_model_types(path: Path) -> set[str]:
    """``model_type`` of a config.json and of its sub-configs (a text config inside a VLM's)."""
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointLoadError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointLoadError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    found = {raw.get("model_type")} | {
        v.get("model_type") for v in raw.values() if isinstance(v, dict)
    }
    return {t for t in found if isinstance(t, str)}


def _load_config(cls, directory: Path):
    """The config of the checkpoint in ``directory`` (through a committed unfinished save),
    checked against the model types ``cls`` accepts."""
    from transformers import AutoConfig, PretrainedConfig

    path = resolve_checkpoint_files(directory).get(CONFIG_NAME)
    if path is None:
        raise FileNotFoundError(
            f"{directory / CONFIG_NAME} does not exist: from_pretrained reads the model's "
            "config from it; save the config there or pass config=..."
        )
    accepted = _accepted_model_types(cls)
    found = _raw_model_types(path)
    if accepted and not found & set(accepted):
        raise CheckpointLoadError(
            f"{path} describes a model of type {sorted(found) or 'unknown (no model_type)'}, "
            f"but {cls.__name__} loads {list(accepted)}"
        )
    config_class = getattr(cls, "config_class", None)
    source = str(directory if path.parent == directory else path)
    try:
        if isinstance(config_class, type) and issubclass(config_class, PretrainedConfig):
            return config_class.from_pretrained(source)
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointLoadError(f"{path} is not a loadable config: {err}") from err


def _check_config_type(cls, config, directory: Path) -> None:
    """A passed-in (or subclass-loaded) config must still be of a type ``cls`` accepts."""
    accepted = _accepted_model_types(cls)
    model_type = getattr(config, "model_type", None)
    if accepted and isinstance(model_type, str) and model_type and model_type not in accepted:
        raise CheckpointLoadError(
            f"config of model type {model_type!r} (for {directory}) cannot build "
            f"{cls.__name__}, which loads {list(accepted)}"
        )


def _maybe_load_generation_config(model, directory: Path) -> None:
    path = resolve_checkpoint_files(directory).get("generation_config.json")
    if path is None:
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(
        path.parent, config_file_name=path.name
    )
