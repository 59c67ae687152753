"""`automodel generate`: sample text from an exported Hugging Face checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from am_automodel.recipe import RecipeError

__all__ = ["generate_text", "load_export"]


def load_export(directory: str):
    """(model, tokenizer) of an export directory, with our model class for registered types."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise RecipeError(f"{directory!r} is not an exported checkpoint (no config.json)")
    from transformers import AutoConfig, AutoTokenizer

    from am_automodel.models import model_spec

    config = AutoConfig.from_pretrained(str(path))
    from am_dtype import BackendConfig

    dtype = getattr(config, "dtype", None) or torch.float32
    model = model_spec(config).from_pretrained(str(path), dtype, BackendConfig())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise RecipeError(f"{directory!r} holds no loadable tokenizer ({err})") from None
    return model.eval(), tokenizer


@torch.no_grad()
def generate_text(directory: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, seed: int = 0) -> str:  # fmt: skip
    """The prompt's continuation (greedy when temperature is 0)."""
    model, tokenizer = load_export(directory)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    input_ids = torch.tensor([ids], device=model.device)
    torch.manual_seed(seed)
    sample = temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens}
    if sample:
        kwargs.update(temperature=temperature, top_k=top_k or None)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         **kwargs)  # fmt: skip
    return tokenizer.decode(out[0, input_ids.shape[1] :].tolist(), skip_special_tokens=True)
