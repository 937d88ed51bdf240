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

from ..checks import clip
from ..config import StoreConfig, reject_unknown
from ..keys.compression import CompressionConfig

__all__ = ["Parser", "int_in", "float_in", "compression_arg", "check_writable", "store_config", "load_config",
           "config_value", "clip"]


def store_config(d: dict[str, Any] | None) -> StoreConfig:
    """The ``[store]`` table as a :class:`StoreConfig`; its values keep their TOML types (a
    ``"false"`` is not a boolean, a ``"64"`` not a number).

    Raises:
        ValueError: ``[store] <the field's error>``.
    """
    if not d:
        return StoreConfig()
    try:
        reject_unknown("[store] keys", d, StoreConfig.__dataclass_fields__)
        return StoreConfig(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e) if str(e).startswith("unknown [store]") else f"[store] {e}") from None


def config_value(where: str, value: Any, action: argparse.Action) -> Any:
    """A ``[train]`` value of the TOML config, checked as the command line checks the option's
    text, and of the option's TOML type: a switch takes only ``true``/``false``, a number option
    only a TOML number (an integer option only an integer), any other option only a string.

    Args:
        where: how the message names the value, e.g. ``run.toml: [train] lr``.
    Returns:
        The value the option would have from the command line.
    Raises:
        ValueError: one line, ``<where> = <value>: <why>``.
    """
    at = f"{where} = {clip(value)}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{at}: must be true or false (a TOML boolean)")
        return value
    kind = getattr(action.type, "__qualname__", "")
    if action.type in (int, float) or kind.startswith(("int_in", "float_in")):
        integer = action.type is int or kind.startswith("int_in")
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise ValueError(f"{at}: must be {'an integer' if integer else 'a number'} (a TOML "
                             f"{'integer' if integer else 'number'}), not {type(value).__name__}")
        try:  # the same range checks as the command line's
            return action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(f"{at}: {e}") from None
    if not isinstance(value, str):
        raise ValueError(f"{at}: must be a string, not {type(value).__name__}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{at} is not one of {sorted(action.choices)}")
    if action.type is not None:
        try:
            return action.type(value)
        except (argparse.ArgumentTypeError, ValueError) as e:
            why = str(e)
            raise ValueError(f"{at}: {why if len(why) <= 160 else why[:150] + ' ...'}") from None
    return value


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
        cfg = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a TOML text file (byte {e.start} is not UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML: {clip(str(e), 120)[1:-1]}") from None
    unknown = sorted(set(cfg) - {"train", "schema", "store", "fields"})
    if unknown:
        raise ValueError(f"{p}: unknown sections {clip(unknown, 80)}; known: [train], [schema], [store], [fields.NAME]")
    for name, v in cfg.items():
        if not isinstance(v, dict):
            raise ValueError(f"{p}: [{name}] must be a table, got {clip(v)}")
    for name, v in cfg.get("fields", {}).items():
        if not isinstance(v, dict):
            raise ValueError(f"{p}: [fields.{clip(name)[1:-1]}] must be a table of options, got {clip(v)}")
    return cfg


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised as one-line ValueErrors (``main`` prints them, exit 2)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        message = " ".join(message.split())  # one line, whatever the arguments held
        if len(message) > 250:  # argparse quotes a bad argument whole
            message = message[:180] + " ... " + message[-60:]
        raise ValueError(message)


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in ``[lo, hi]``."""
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {clip(text)}") from None
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
            raise argparse.ArgumentTypeError(f"must be a number, got {clip(text)}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo)
        if hi is not None:
            ok = ok and (v < hi if hi_open else v <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {rng}, got {clip(text)[1:-1]}")
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
