"""The files of a Hugging Face checkpoint directory: an atomic save protocol and validated reads.

Save protocol (``write_checkpoint``), so that at every instant the directory holds either the
complete previous checkpoint or the complete new one:

1. Recover: finish a committed save that was interrupted, and remove the staging
   directories of saves that never committed (``.am-save-<hex>``, only ever made by us).
2. Stage: write every new file (config, generation config, weight shards, index) into a
   fresh staging directory ``.am-save-<hex>/`` inside the target, then fsync each file and
   the staging directory. New shards get names no file in the target has (the standard
   ``model-0000i-of-0000N.safetensors`` when free, else ``model-<hex>-0000i-of-0000N``),
   so the previous checkpoint's files are never overwritten before the commit. A config
   byte-identical to the one in place is not rewritten.
3. Commit: write the plan (an ordered list of moves and removals) and rename it to
   ``COMMITTED.json`` inside the staging directory, then fsync. This one rename is the
   commit point: before it the target is untouched, after it the new checkpoint is defined.
4. Roll forward: move the new shards in (nobody references them yet), then switch the
   weights entry (rename the index or ``model.safetensors`` over the old one; a now
   shadowing ``model.safetensors`` / stale index is removed right after), then rename the
   configs into place, then remove the previous checkpoint's shards, then the staging
   directory, with an fsync of the target after each group. Every step is idempotent, so an
   interrupted roll forward is finished by the next save.

An exception before the commit (disk full on shard 3 of 5) removes the staging directory and
leaves the target untouched; a killed process leaves only the staging directory, which the
next save removes. Readers here (``resolve_checkpoint_files``) see a committed but
unfinished save as the complete new checkpoint (staged files overlay the target), and never
look inside uncommitted staging directories. A reader that does not know the protocol
(transformers) sees the old or the new checkpoint at every instant when the config is
unchanged (each switch is then one rename or one unlink); when the config changes it can
see the new weights with the old config for the microseconds between two renames of the
roll forward. One writer per directory at a time.

Files removed by a save are only those of the checkpoint it replaces: the weights entry of
the format it writes (``model.safetensors`` / ``model.safetensors.index.json``, or the
``pytorch_model`` pair) and the shards the old index lists. Everything else (README.md,
``pytorch_model.bin`` beside a safetensors save, shards of another naming) is kept.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
# The weights entry files in the order transformers (and our reader) look for them:
# a single file beats an index of the same format, safetensors beats pickle.
WEIGHT_ENTRIES = (
    (SAFE_WEIGHTS_NAME, False),
    (SAFE_INDEX_NAME, True),
    (BIN_WEIGHTS_NAME, False),
    (BIN_INDEX_NAME, True),
)
STAGE_PREFIX = ".am-save-"
_STAGE_RE = re.compile(r"^\.am-save-[0-9a-f]{12}$")
COMMIT_NAME = "COMMITTED.json"
_PLAN_TMP = "plan.json.tmp"


class CheckpointLoadError(ValueError):
    """A checkpoint cannot be loaded into the model: a corrupt file, or missing, unexpected
    and mismatched keys (all listed in one message)."""


# ----------------------------------------------------------------------------- durability
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames/creations/unlinks in ``path`` durable (a no-op where directories cannot
    be opened or fsynced, e.g. Windows or some network filesystems)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- staging
def _read_plan(stage: Path) -> dict | None:
    """The committed plan of a staging directory, or None when it never committed."""
    path = stage / COMMIT_NAME
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # written by rename, so only foreign damage gets here
        raise CheckpointLoadError(f"{path}: unreadable save plan ({err})") from err
    if not isinstance(plan, dict) or not isinstance(plan.get("ops"), list):
        raise CheckpointLoadError(f"{path}: not a save plan (no 'ops' list)")
    return plan


def _stages(directory: Path) -> list[tuple[Path, dict | None]]:
    """Our staging directories, committed ones in commit order, uncommitted first."""
    found = []
    for path in directory.iterdir():
        if _STAGE_RE.match(path.name) and path.is_dir() and not path.is_symlink():
            found.append((path, _read_plan(path)))
    return sorted(found, key=lambda item: -1 if item[1] is None else item[1]["created_ns"])


def _roll_forward(directory: Path, stage: Path, plan: dict) -> None:
    """Apply a committed plan (idempotent: a finished step is skipped), then drop the stage."""
    for step in plan["ops"]:
        if step == ["fsync"]:
            _fsync_dir(directory)
            continue
        op, name = step
        if op == "move":
            if (stage / name).is_file():
                os.replace(stage / name, directory / name)
        elif op == "remove":
            target = directory / name
            if target.is_file() and not target.is_symlink():
                target.unlink()
        else:
            raise CheckpointLoadError(f"{stage / COMMIT_NAME}: unknown step {step!r}")
    _fsync_dir(directory)
    shutil.rmtree(stage)
    _fsync_dir(directory)


def recover(directory: str | os.PathLike) -> None:
    """Finish every committed but interrupted save in ``directory`` and remove the staging
    directories of saves that never committed. ``save_pretrained`` calls this first."""
    directory = Path(directory)
    for stage, plan in _stages(directory):
        if plan is None:
            logger.warning("Removing %s, left by an interrupted save that never committed", stage)
            shutil.rmtree(stage)
        else:
            logger.warning("Finishing the committed save left in %s", stage)
            _roll_forward(directory, stage, plan)
    _fsync_dir(directory)


# ----------------------------------------------------------------------------- writing
def _plan_shards(hf_sd: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
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


def _shard_names(directory: Path, stem: str, ext: str, count: int, tag: str) -> list[str]:
    """File names for ``count`` new shards that no existing file in ``directory`` has."""
    if count == 1:
        return [f"{stem}.{ext}"]  # replaced by rename: one atomic switch
    standard = [f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]
    if not any((directory / name).exists() for name in standard):
        return standard
    # transformers' stale-shard cleanup (`<stem>*-NNNNN-of-NNNNN`) still recognizes these.
    return [f"{stem}-{tag}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], safe: bool) -> None:
    """Write one weight file and fsync it."""
    if safe:
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)
    _fsync_file(path)


def _detach_shared_views(hf_sd: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    storage_use: dict[int, int] = {}
    for tensor in hf_sd.values():
        ptr = tensor.untyped_storage().data_ptr()
        storage_use[ptr] = storage_use.get(ptr, 0) + 1

    def get(name: str) -> torch.Tensor:
        tensor = hf_sd[name].contiguous()
        # Views into one storage (e.g. an adapter splitting a fused weight) are copied:
        # safetensors refuses tensors that share memory.
        if storage_use[hf_sd[name].untyped_storage().data_ptr()] > 1:
            tensor = tensor.clone()
        return tensor

    return get


def _write_weights(
    stage: Path, directory: Path, hf_sd: Mapping[str, torch.Tensor], max_bytes: int, safe: bool
) -> tuple[list[str], str]:
    """Write the shards (and index) into ``stage``; returns (shard names, entry file name)."""
    shards = _plan_shards(hf_sd, max_bytes)
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    tag = stage.name.removeprefix(STAGE_PREFIX)
    names = _shard_names(directory, stem, ext, len(shards), tag)
    get = _detach_shared_views(hf_sd)
    for file_name, keys in zip(names, shards, strict=True):
        _write_shard(stage / file_name, {k: get(k) for k in keys}, safe)
    if len(shards) == 1:
        return names, names[0]
    index_name = SAFE_INDEX_NAME if safe else BIN_INDEX_NAME
    weight_map = {k: f for f, keys in zip(names, shards, strict=True) for k in keys}
    index = {
        "metadata": {
            "total_size": sum(t.numel() * t.element_size() for t in hf_sd.values()),
            "total_parameters": sum(t.numel() for t in hf_sd.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (stage / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _fsync_file(stage / index_name)
    return names, index_name


def _old_shards(directory: Path, index_name: str) -> set[str]:
    """Shards the index in place lists (plain names of existing files only)."""
    path = directory / index_name
    if not path.is_file():
        return set()
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        names = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("%s is unreadable (%s); keeping every shard beside it", path, err)
        return set()
    return {
        n for n in names if isinstance(n, str) and Path(n).name == n and (directory / n).is_file()
    }


def _plan_ops(
    directory: Path, stage: Path, shards: list[str], entry: str, safe: bool
) -> list[list[str]]:
    single, index = (
        (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) if safe else (BIN_WEIGHTS_NAME, BIN_INDEX_NAME)
    )
    stale_shards = _old_shards(directory, index) - set(shards)
    ops: list[list[str]] = [["move", n] for n in shards if n != entry] + [["fsync"]]
    ops.append(["move", entry])
    # The other entry of this format would shadow (single file) or contradict (index) it.
    ops.append(["remove", index if entry == single else single])
    others = sorted(p.name for p in stage.iterdir() if p.name not in set(shards) | {entry})
    ops += [["move", n] for n in others] + [["fsync"]]
    ops += [["remove", n] for n in sorted(stale_shards)]
    return ops


def _drop_unchanged(stage: Path, directory: Path, names: list[str]) -> None:
    """Remove staged files byte-identical to the ones in place: nothing to switch."""
    for name in names:
        staged, current = stage / name, directory / name
        if staged.is_file() and current.is_file() and not current.is_symlink():
            if staged.read_bytes() == current.read_bytes():
                staged.unlink()


def _check_not_shadowed(directory: Path, safe: bool) -> None:
    if safe:
        return
    shadowing = [n for n in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) if (directory / n).is_file()]
    if shadowing:
        raise ValueError(
            f"{directory} holds a safetensors checkpoint ({shadowing}) that loaders prefer over "
            "pytorch_model*.bin, so a safe_serialization=False save there would never be "
            "read; save with safe_serialization=True or into another directory"
        )


def write_checkpoint(
    directory: str | os.PathLike,
    hf_sd: Mapping[str, torch.Tensor],
    *,
    max_bytes: int,
    safe: bool,
    write_metadata: Callable[[Path], None] | None = None,
) -> list[str]:
    """Atomically replace the checkpoint in ``directory`` with ``hf_sd`` (see the module
    docstring for the protocol). ``write_metadata(stage_dir)`` writes the config files into
    the staging directory. Returns the names of the weight files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover(directory)
    _check_not_shadowed(directory, safe)
    stage = directory / f"{STAGE_PREFIX}{secrets.token_hex(6)}"
    stage.mkdir()
    _fsync_dir(directory)
    try:
        if write_metadata is not None:
            write_metadata(stage)
            metadata = [p.name for p in stage.iterdir()]
            for name in metadata:
                _fsync_file(stage / name)
            _drop_unchanged(stage, directory, metadata)
        shards, entry = _write_weights(stage, directory, hf_sd, max_bytes, safe)
        plan = {
            "created_ns": time.time_ns(),
            "ops": _plan_ops(directory, stage, shards, entry, safe),
        }
        (stage / _PLAN_TMP).write_text(json.dumps(plan, indent=1) + "\n")
        _fsync_file(stage / _PLAN_TMP)
        _fsync_dir(stage)
        os.replace(stage / _PLAN_TMP, stage / COMMIT_NAME)  # the commit point
        _fsync_dir(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _fsync_dir(directory)
        raise
    try:
        _roll_forward(directory, stage, plan)
    except BaseException as err:
        err.add_note(
            f"The new checkpoint is committed in {stage}: loaders here read it already, and "
            "the next save_pretrained into this directory finishes moving it into place."
        )
        raise
    return shards + ([entry] if entry not in shards else [])


# ----------------------------------------------------------------------------- reading
def resolve_checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Name -> path of the files of the checkpoint in ``directory`` as a loader should see
    them: the files in place, overlaid by a committed but unfinished save (staged files
    replace, planned removals disappear). Uncommitted staging directories are ignored."""
    directory = Path(directory)
    files = {p.name: p for p in directory.iterdir() if p.is_file()}
    for stage, plan in _stages(directory):
        if plan is None:
            continue
        for step in plan["ops"]:
            if step == ["fsync"]:
                continue
            op, name = step
            if op == "move" and (stage / name).is_file():
                files[name] = stage / name
            elif op == "remove":
                files.pop(name, None)
    return files


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, ValueError) as err:
        size = path.stat().st_size
        raise CheckpointLoadError(
            f"{path} ({size} bytes) is not a readable weights file: {err}. It may be "
            "truncated or only partly written; re-save or re-download it"
        ) from err


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointLoadError(f"{path} is not valid JSON ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointLoadError(
            f"{path} has no 'weight_map' object (tensor name -> shard file); "
            f"top-level keys: {sorted(index) if isinstance(index, dict) else type(index).__name__}"
        )
    bad = {k: v for k, v in weight_map.items() if not isinstance(v, str)}
    if bad:
        raise CheckpointLoadError(f"{path}: weight_map values must be file names, got {bad}")
    return weight_map


def _read_sharded(index_path: Path, files: Mapping[str, Path]) -> dict[str, torch.Tensor]:
    weight_map = _read_index(index_path)
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = files.get(shard, index_path.parent / shard)
        if not path.is_file():
            raise CheckpointLoadError(f"{index_path} lists shard {shard!r}, which does not exist")
        tensors = _load_weight_file(path)
        listed = [k for k, v in weight_map.items() if v == shard]
        absent = [k for k in listed if k not in tensors]
        if absent:
            raise CheckpointLoadError(
                f"{index_path} maps {len(absent)} tensors to {shard!r} that it does not hold: "
                f"{absent[:10]}"
            )
        twice = sorted(set(tensors) & set(state_dict))
        if twice:
            raise CheckpointLoadError(f"tensors {twice[:10]} appear in more than one shard")
        state_dict.update(tensors)
    return state_dict


def read_hf_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a local HF checkpoint directory onto the CPU.

    Looks for, in transformers' order: ``model.safetensors``, ``model.safetensors.index.json``
    (sharded), ``pytorch_model.bin``, ``pytorch_model.bin.index.json``. A corrupt file (a
    truncated or empty shard, an index that is not JSON or lacks ``weight_map``, a shard it
    names that is missing) raises ``CheckpointLoadError`` naming the file.
    """
    directory = Path(directory)
    for attempt in range(3):
        files = resolve_checkpoint_files(directory)
        try:
            for file_name, is_index in WEIGHT_ENTRIES:
                if file_name in files:
                    path = files[file_name]
                    return _read_sharded(path, files) if is_index else _load_weight_file(path)
        except (FileNotFoundError, CheckpointLoadError):
            # A save finishing concurrently may have moved a file between listing and
            # opening it: look again before reporting.
            if attempt == 2 or resolve_checkpoint_files(directory) == files:
                raise
            continue
        break
    raise FileNotFoundError(
        f"No weights in {str(directory)!r}: looked for {[f for f, _ in WEIGHT_ENTRIES]}"
    )
