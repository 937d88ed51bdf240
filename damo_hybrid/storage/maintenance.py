"""Maintenance over a table's stored rows: expiry and dumps (export for serving).

Both scan the storage in key order through :class:`~damo_hybrid.storage.rowio.RowIO`; the
store flushes every cache tier to the storage before calling them, so they see the newest
row of every key.

Functions only; the store calls them under its lock.
"""

from __future__ import annotations

import datetime as _dt
import os
import time

import numpy as np

from ..rows.codec import Rows
from ..rows.table import Table
from .files import atomic_file
from .rowio import RowIO

__all__ = ["DAY", "dump_window", "stale_mask", "expiry_rule", "expired_keys", "dump_tables"]

DAY = 86400.0


def dump_window(min_count: int, expire_days: float | None, now: float | None) -> tuple[float, float | None]:
    """Validate dump conditions; returns ``(now, max age in seconds or None)``."""
    if not isinstance(min_count, int) or min_count < 0:
        raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
    if expire_days is not None and not (isinstance(expire_days, (int, float)) and expire_days > 0):
        raise ValueError(f"expire_days must be None or > 0, got {expire_days!r}")
    return (time.time() if now is None else float(now)), (expire_days * DAY if expire_days is not None else None)


def stale_mask(rows: Rows, now: float, age: float | None, min_count: int) -> np.ndarray:
    """bool (M,): rows older than ``age`` seconds or with fewer than ``min_count`` updates."""
    bad = rows.count < min_count
    if age is not None:
        bad |= rows.updated < now - age
    return bad


def expiry_rule(t: Table, older_than: _dt.timedelta | None, min_count: int | None) -> tuple[float | None, int] | None:
    """``(max age in seconds or None, min count)`` of an expiry sweep, or None to keep the table:
    the arguments where given, else the table's :class:`~damo_hybrid.config.ExpiryConfig`."""
    if older_than is None and min_count is None:
        exp = t.cfg.expiry
        if exp is None:
            return None
        return (exp.max_age_days * DAY if exp.max_age_days is not None else None), exp.min_count
    return (older_than.total_seconds() if older_than is not None else None), (min_count or 0)


def expired_keys(io: RowIO, t: Table, now: float, age: float | None, min_count: int) -> np.ndarray:
    """uint64 (K,) keys of the table's stale rows."""
    parts = [k[stale_mask(rows, now, age, min_count)] for k, rows in io.scan(t)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def dump_tables(io: RowIO, tables: list[Table], path: str | os.PathLike[str], now: float, age: float | None,
                min_count: int) -> dict[str, int]:
    """Write ``keys_<t>``, ``weights_<t>``, ``counts_<t>``, ``updated_<t>`` of the rows kept, atomically.

    Returns:
        Rows written per table.
    """
    arrays: dict[str, np.ndarray] = {}
    written: dict[str, int] = {}
    for t in tables:
        keep_rows = Rows(np.zeros((0, t.dim), np.float32), np.zeros((0, t.width), np.float32),
                         np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        ks = [np.zeros(0, np.uint64)]
        parts = [keep_rows]
        for k, rows in io.scan(t):
            keep = ~stale_mask(rows, now, age, min_count)
            ks.append(k[keep])
            parts.append(rows.take(keep))
        arrays[f"keys_{t.name}"] = np.concatenate(ks)
        arrays[f"weights_{t.name}"] = np.concatenate([p.weights for p in parts])
        arrays[f"counts_{t.name}"] = np.concatenate([p.count for p in parts])
        arrays[f"updated_{t.name}"] = np.concatenate([p.updated for p in parts])
        written[t.name] = len(arrays[f"keys_{t.name}"])
    with atomic_file(path) as f:
        np.savez(f, **arrays)
    return written
