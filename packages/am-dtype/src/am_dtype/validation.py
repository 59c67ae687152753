"""Field checks for config dataclasses: bools are bools, ints are ints in range, floats finite.

Each check raises at construction naming the field as `Owner.field=value`: a TypeError for a
value of the wrong type (a string "0.01" for a float, True for an int), a ValueError for one
out of range (a negative count, a NaN). Ints are accepted where a float is expected and are
returned as floats; bools never count as numbers.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_bool", "check_float", "check_int", "check_optional_bool"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """`value` itself if it is a bool; else a TypeError naming `owner.name`."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name}={value!r} must be a bool (True or False)")
    return value


def check_optional_bool(owner: str, name: str, value: Any) -> bool | None:
    """Like `check_bool`, also accepting None."""
    return None if value is None else check_bool(owner, name, value)


def check_int(owner: str, name: str, value: Any, *, low: int | None = None) -> int:
    """`value` as an int if it is an integer (not a bool) and >= `low`."""
    if not _is_int(value):
        raise TypeError(f"{owner}.{name}={value!r} must be an int")
    if low is not None and value < low:
        raise ValueError(f"{owner}.{name}={value!r} must be an int >= {low}")
    return int(value)


def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    strictly_above: bool = False,
) -> float:
    """`value` as a finite float (ints accepted, bools and strings not), >= `low`.

    With `strictly_above`, `value` must be > `low`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}.{name}={value!r} must be a float")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{name}={value!r} must be a finite float")
    if low is not None and (value <= low if strictly_above else value < low):
        raise ValueError(
            f"{owner}.{name}={value!r} must be {'>' if strictly_above else '>='} {low}"
        )
    return value
