"""Hugging Face export: safetensors + config + tokenizer (+ the recipe) in one directory.

`transformers.AutoModelForCausalLM.from_pretrained(dir)` (and our model classes) load it, and
`automodel generate dir` samples from it. Sharded (DTensor) weights are gathered by the
model's `save_pretrained` (a collective: every rank calls `export_hf`); rank 0 writes into
`dir.tmp` and renames it into place, so `dir` is always absent, the old export or the new
one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

__all__ = ["export_hf"]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export_hf(model, tokenizer, recipe_yaml: str, directory: str | os.PathLike, rank: int) -> Path:
    """Write the model as a Hugging Face checkpoint directory; returns it."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    _barrier()
    from am_utils.checkpointing import HFCheckpointingMixin

    # Ours first: Gemma 4 is also a transformers PreTrainedModel, but its save_pretrained is
    # the mixin's collective one (every rank gathers, then a barrier).
    if isinstance(model, HFCheckpointingMixin):
        model.save_pretrained(str(tmp), is_main_process=rank == 0)
    else:  # a transformers PreTrainedModel: gather on every rank, rank 0 writes
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if rank == 0:
            model.save_pretrained(str(tmp), state_dict=full)
    if rank == 0:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        _replace_dir(tmp, final)
    _barrier()
    return final
