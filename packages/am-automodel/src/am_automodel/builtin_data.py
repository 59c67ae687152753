"""The built-in dataset: short templated stories generated from a seed, no file, no network.

Each document is a few sentences about named people, objects and small counts, with the
arithmetic and the names kept consistent inside the story, so a tiny model's loss falls
clearly within a few dozen steps (the words repeat; the counts follow from the story).
"""

from __future__ import annotations

import random

__all__ = ["builtin_documents"]

_NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jade"]
_THINGS = ["apples", "books", "cups", "eggs", "pens", "shells", "stones", "coins"]
_COLORS = ["red", "blue", "green", "white", "black", "yellow"]
_PLACES = ["the park", "the market", "school", "the river", "the library", "home"]


def _story(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    thing, color, place = rng.choice(_THINGS), rng.choice(_COLORS), rng.choice(_PLACES)
    have = rng.randint(2, 9)
    give = rng.randint(1, have - 1)
    left = have - give
    parts = [
        f"{a} went to {place} with {have} {color} {thing}.",
        f"At {place}, {a} met {b}.",
        f"{a} gave {give} {color} {thing} to {b}.",
        f"Now {a} has {left} {color} {thing} and {b} has {give}.",
    ]
    if rng.random() < 0.5:
        parts.append(f"{b} said thank you to {a}.")
    return " ".join(parts)


def builtin_documents(n: int, seed: int = 1234) -> list[str]:
    """`n` stories; the same `seed` always gives the same list (the data is part of the code)."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]
