"""Tokenizers: a local Hugging Face tokenizer directory, or the built-in byte-level one.

The built-in tokenizer maps every byte b to id 3 + b (ids 0, 1, 2 are `<pad>`, `<s>`, `</s>`),
so any text round-trips without a vocabulary file. It is a real `PreTrainedTokenizerFast`
(a `tokenizers` BPE with no merges over the byte-level alphabet): `save_pretrained` writes it
next to an export and `AutoTokenizer.from_pretrained` loads it back, so `generate` works.
"""

from __future__ import annotations

from pathlib import Path

from am_automodel.recipe import RecipeError, TokenizerSection

__all__ = ["BYTE_VOCAB_SIZE", "build_tokenizer", "byte_tokenizer"]

BYTE_VOCAB_SIZE = 259
_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2}


def _bytes_to_unicode() -> dict[int, str]:
    """The printable stand-in character of every byte that the ByteLevel pre-tokenizer uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """The built-in byte-level tokenizer (259 ids), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(_SPECIALS)
    for byte, char in _bytes_to_unicode().items():
        vocab[char] = 3 + byte
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the text's bytes map one to one onto ids.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tokenizer(section: TokenizerSection):
    """The recipe's tokenizer: `AutoTokenizer.from_pretrained(path)` or the byte-level one."""
    if section.path is None:
        return byte_tokenizer()
    path = Path(section.path)
    if not path.is_dir():
        raise RecipeError(f"tokenizer.path = {section.path!r}: no such directory")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(
            f"tokenizer.path = {section.path!r}: cannot load a tokenizer ({first})"
        ) from None
    if tok.pad_token_id is None:
        # Packed rows never pad; generate() and eval batching need some pad id.
        tok.pad_token = tok.eos_token
    return tok
