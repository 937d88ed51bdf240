"""Validation of config values: each names the field and the bad value in its error."""

from __future__ import annotations

import difflib
import enum
import math
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["finite", "positive", "non_negative", "unit_interval", "int_at_least", "clip", "member", "reject_unknown"]

E = TypeVar("E", bound=enum.Enum)


def clip(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters: all an error message quotes of a bad value
    (one from a file or a config may be huge: a 100 kB field, a binary line)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 4] + ("...'" if r[0] in "'\"" else "...")


def finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {clip(value)}")


def positive(name: str, value: float) -> None:
    finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {clip(value)}")


def non_negative(name: str, value: float) -> None:
    finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {clip(value)}")


def unit_interval(name: str, value: float) -> None:
    finite(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {clip(value)}")


def int_at_least(name: str, value: object, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {clip(value)}")


def reject_unknown(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    """The one check of user-given names (config dicts, TOML tables, seed parameters).

    Raises:
        ValueError: ``unknown <what> [names]; known: [names]``.
    """
    known = sorted(known)
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        names = clip(unknown, 80)
        if len(repr(known)) <= 160:
            raise ValueError(f"unknown {what} {names}; known: {known}")
        close = sorted({m for u in unknown[:5] for m in difflib.get_close_matches(str(u)[:64], known, n=2)})
        raise ValueError(f"unknown {what} {names}; " + (f"did you mean {close}? " if close else "")
                         + f"({len(known)} known, e.g. {clip(known[:4], 80)})")


def member(kind: type[E], what: str, value: Any) -> E:
    """``kind(value)``, only from a member or its string value (never from another type), with a short error."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        for m in kind:
            if m.value == value:
                return m
    raise ValueError(f"{what} must be one of {[m.value for m in kind]}, got {clip(value)}")
