"""Maintenance over a table's stored rows: expiry and dumps (export for serving).

Both scan the storage in key order through :class:`~damo_hybrid.storage.rowio.RowIO`.
:class:`StoreMaintenance` holds the store's public methods built on them (scan, count,
expire, export, dump, compaction, checkpoints), mixed into
:class:`~damo_hybrid.store.EmbeddingStore`: each takes the store's lock and flushes the
table's cache tiers to the storage first, so it sees the newest row of every key.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DamoHybridError
from ..rows.codec import Rows
from ..rows.table import Table
from .backend import Storage
from .checkpoint import write_checkpoint
from .files import atomic_file
from .rowio import RowIO

if TYPE_CHECKING:
    from ..cache.registry import TierRegistry

__all__ = ["DAY", "StoreMaintenance", "dump_window", "stale_mask", "expiry_rule", "expired_keys", "dump_tables"]

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


class StoreMaintenance:
    """The store's scan-based methods (mixed into :class:`~damo_hybrid.store.EmbeddingStore`)."""

    _lock: threading.RLock
    _io: RowIO
    _caches: TierRegistry
    _storage: Storage
    _tables: dict[str, Table]
    root: Path | None
    read_only: bool

    def _check_open(self) -> None: ...
    def _check_writable(self) -> None: ...
    def _table(self, name: str) -> Table: ...
    def _write_meta(self, root: Path | None = None, live: bool | None = None) -> None: ...

    def scan(self, table: str, batch: int = 65536) -> Iterator[tuple[np.ndarray, Rows]]:
        """Every stored row of a table in key order (cached updates are flushed first).

        Yields:
            ``(keys uint64 (M,), rows)`` chunks of at most ``batch`` rows.
        """
        with self._lock:
            self._check_open()
            t = self._table(table)
            if not self.read_only:
                self._caches.flush([table])
        yield from self._io.scan(t, batch)

    def count_rows(self, table: str) -> int:
        """Exact number of stored rows (a full scan of the table)."""
        return sum(len(k) for k, _ in self.scan(table))

    def _select(self, tables: Iterable[str] | None) -> list[Table]:
        if tables is None:
            return list(self._tables.values())
        names = [tables] if isinstance(tables, str) else list(tables)
        return [self._table(n) for n in names]

    def expire(
        self,
        older_than: _dt.timedelta | None = None,
        min_count: int | None = None,
        tables: Iterable[str] | None = None,
        now: float | None = None,
    ) -> int:
        """Delete stale rows from every tier; they return to their initial value if seen again.

        A row is removed when it was last updated before ``now - older_than``,
        or has fewer than ``min_count`` updates. With neither given, each
        table's :class:`ExpiryConfig` decides (tables without one are kept).

        Args:
            older_than: age limit.
            min_count: minimum update count to keep a row.
            tables: table names (default all).
            now: the current unix time (default ``time.time()``).
        Returns:
            The number of rows removed.
        """
        if older_than is not None and not isinstance(older_than, _dt.timedelta):
            raise TypeError(f"older_than must be a datetime.timedelta, got {type(older_than).__name__}")
        if min_count is not None and (not isinstance(min_count, int) or min_count < 0):
            raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
        now = time.time() if now is None else float(now)
        removed = 0
        with self._lock:
            self._check_writable()
            for t in self._select(tables):
                rule = expiry_rule(t, older_than, min_count)
                if rule is None:
                    continue
                age, mc = rule
                with self._caches.lock(t.name):  # no row comes back into a tier until it is deleted
                    self._caches.flush([t.name])
                    doomed = expired_keys(self._io, t, now, age, mc)
                    if len(doomed):
                        removed += self._caches.delete(t.name, doomed, lambda k, t=t: self._io.delete(t, k))
        return removed

    def export(self, path: str | os.PathLike[str], tables: Iterable[str] | None = None) -> dict[str, int]:
        """Write every row's weights to ``.npz`` for serving.

        The file holds ``keys_<table>`` (uint64 (M,)) and ``weights_<table>``
        (float32 (M, dim)) for each table. It is written to a temp file and
        renamed, so a reader never sees half a file.

        Returns:
            Rows written per table.
        """
        return self.dump(path, tables=tables)

    def dump(
        self,
        path: str | os.PathLike[str],
        tables: Iterable[str] | None = None,
        min_count: int = 0,
        expire_days: float | None = None,
        now: float | None = None,
    ) -> dict[str, int]:
        """Like :meth:`export`, keeping only rows with at least ``min_count``
        updates and, if ``expire_days`` is set, updated within that many days.

        Also writes ``counts_<table>`` (int64 update counts) and
        ``updated_<table>`` (int64 unix seconds).

        Returns:
            Rows written per table.
        """
        now, age = dump_window(min_count, expire_days, now)
        with self._lock:
            self._check_open()
            ts = self._select(tables)
            if not self.read_only:
                self._caches.flush([t.name for t in ts])
            return dump_tables(self._io, ts, path, now, age, min_count)

    def load_rows(self, table: str, keys: np.ndarray, rows: Rows, step: int | None = None) -> None:
        """Write whole rows (weights, optimizer state, counts, times) as they are, and optionally
        set the table's global step: how a restore moves rows between stores (re-sharding).

        Args:
            keys: uint64 (N,) distinct keys; rows: their N rows.
        Raises:
            RuntimeError: the table is cached (its tiers could hold other copies of these rows).
        """
        with self._lock:
            self._check_open()
            self._check_writable()
            t = self._table(table)
            if self._caches.get(table) is not None:
                raise RuntimeError(f"load_rows writes past the cache tiers: table {table!r} must not be cached yet")
            if len(keys):
                self._io.write(t, keys, rows, ~self._io.read(t, keys)[1])
            if step is not None:  # the rows' count reaches meta.json with the next flush, as any write's
                t.step = int(step)
                self._write_meta()

    def compact(self) -> None:
        """Full RocksDB compaction: reclaims deleted rows, applies TTL."""
        with self._lock:
            self._check_writable()
            self._storage.compact()

    def wait_for_compactions(self, timeout: float = 300.0) -> float:
        """Wait until RocksDB's background compactions are done (benchmarks use
        this to measure a settled store). Returns the seconds waited."""
        with self._lock:
            self._check_open()
        return float(self._storage.wait_for_compactions(timeout))

    def running_compactions(self) -> int:
        """Background compactions running now (0 for the memory backend); for benchmarks."""
        with self._lock:
            self._check_open()
            return int(self._storage.running_compactions())

    # ----------------------------------------------------------- checkpoint
    def checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write a consistent, atomic snapshot of rows (cached updates included), counters
        and configs.

        The snapshot is built in a hidden sibling directory and renamed into
        place only when complete, with a ``CHECKPOINT.json`` marker written
        last; an interrupted checkpoint leaves no directory at ``path``.
        RocksDB hard-links its immutable files, so this is cheap.

        Args:
            path: the checkpoint directory; must not exist yet.
        Returns:
            The checkpoint path.
        """
        with self._lock:
            self._check_writable()
            if self.root is None:
                raise DamoHybridError("an in-memory store cannot be checkpointed; open it on a path")
            if Path(path).exists():
                raise FileExistsError(f"checkpoint path {path} already exists; choose a new directory")
            self._caches.flush()
            self._io.flush()
            dst = write_checkpoint(self._storage, Path(path), self._write_meta, list(self._tables))
            self._write_meta()
            return dst
