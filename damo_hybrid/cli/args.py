"""The command line's argument checking: one-line errors, range-checked numbers, config files.

Used by :mod:`damo_hybrid.cli`; prints nothing.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ..config import StoreConfig, reject_unknown
from ..keys.compression import CompressionConfig

__all__ = ["Parser", "int_in", "float_in", "compression_arg", "check_writable", "store_config", "load_config"]


def store_config(d: dict[str, Any] | None) -> StoreConfig:
    if not d:
        return StoreConfig()
    reject_unknown("[store] keys", d, StoreConfig.__dataclass_fields__)
    return StoreConfig(**d)


def load_config(path: str) -> dict[str, Any]:
    """A TOML file: a ``[train]`` table of train options, and optional ``[schema]``, ``[store]``
    and ``[fields.NAME]`` tables (a field's own table options)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no config file {p}")
    try:
        cfg = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML: {e}") from e
    unknown = sorted(set(cfg) - {"train", "schema", "store", "fields"})
    if unknown:
        raise ValueError(f"{p}: unknown sections {unknown}; known: [train], [schema], [store], [fields.NAME]")
    return cfg


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised as one-line ValueErrors (``main`` prints them, exit 2)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise ValueError(message)


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in ``[lo, hi]``."""
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}" if hi is not None
                                             else f"must be >= {lo}, got {v}")
        return v
    return conv


def float_in(lo: float, hi: float | None = None, lo_open: bool = True, hi_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite float in the range (open or closed ends)."""
    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo)
        if hi is not None:
            ok = ok and (v < hi if hi_open else v <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {rng}, got {text}")
        return v
    return conv


def compression_arg(text: str) -> CompressionConfig:
    """An argparse type: a :meth:`CompressionConfig.parse` spec."""
    try:
        return CompressionConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_writable(option: str, path: str | None) -> None:
    """Check up front that a file can be written at ``path`` (not after a long run)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{option} {path} is not writable")
