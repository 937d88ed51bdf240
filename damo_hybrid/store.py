"""The embedding store: many tables of rows on disk, their cache tiers, and a numpy batch API.

:class:`EmbeddingStore` is the facade users hold. It owns, per store:

- the storage (RocksDB, or the in-memory reference) and its row I/O (:mod:`damo_hybrid.storage`);
- the table registry: one :class:`~damo_hybrid.rows.table.Table` per table (its global step);
- at most one :class:`~damo_hybrid.cache.tiers.TableTiers` per table (host tier, optional device
  tier, writer), made by :meth:`EmbeddingStore.cache`, shared by every user of the table.

Every public read (:meth:`~EmbeddingStore.lookup`, :meth:`~EmbeddingStore.read_rows`) sees the
newest row in whatever tier it is; every scan (export, dump, expiry, checkpoint) and
:meth:`~EmbeddingStore.close` first sends every update down to the storage. A failed flush
raises :class:`~damo_hybrid.errors.WriteBackError` and keeps the rows in memory.

Layout of a store directory::

    meta.json          tables (id, config, global step, row count), format, TTL mode
    admission/<id>.npy counting-Bloom counters of tables with admission
    keyfilter/         each table's record of stored keys (saved at close and in checkpoints)
    db/                the RocksDB database (rows)

RocksDB's own LOCK file makes a second writer fail with :class:`~damo_hybrid.errors.StoreLockedError`.
A crash loses at most the updates still in the cache tiers (and, without ``StoreConfig.write_ahead_log``,
the rows they wrote back), global steps, row counts and admission counts since the last ``flush()``/``checkpoint()``.

Thread safety: one store may be shared between threads; every public method takes the store's
lock, and each table's tiers have their own (:mod:`damo_hybrid.cache.tiers`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cache.host import CacheStats
from .cache.registry import TierRegistry
from .cache.tiers import TableTiers
from .config import StoreConfig, TableConfig
from .errors import (
    ConfigConflictError,
    DamoHybridError,
    StoreClosedError,
    UnknownTableError,
)
from .keys.hashing import as_keys
from .keys.kernels import unique_inverse
from .rows.codec import Rows
from .rows.table import Table
from .storage.backend import MemoryStorage, Storage
from .storage.checkpoint import restore_checkpoint
from .storage.keyfilter import StoredKeyFilter
from .storage.maintenance import StoreMaintenance
from .storage.meta import (
    check_change,
    check_ttl,
    load_tables,
    open_filters,
    read_meta,
    recount_rows,
    store_root,
    write_meta,
)
from .storage.rocksdb import RocksDBStorage
from .storage.rowio import RowIO

__all__ = ["EmbeddingStore", "StoreStats", "open_memory_store"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was opened (rows and bytes: current totals).

    Attributes:
        rows: stored rows per the store's running count (exact unless the process crashed since the
            last flush, or TTL mode dropped rows; ``count_rows`` scans). Cached rows count once written.
        disk_bytes: RocksDB's SST + memtable size.
        hits, misses: unique keys found on disk by reads, and not stored (new or never admitted).
        writes: rows written.
        dropped_nonfinite: gradient rows dropped for NaN/Inf (``skip`` policy).
        dropped_unadmitted: unique keys whose gradients were dropped because admission had not let them in.
        table_rows: ``rows`` per table.
    """

    rows: int
    disk_bytes: int
    hits: int
    misses: int
    writes: int
    dropped_nonfinite: int
    dropped_unadmitted: int
    table_rows: dict[str, int] = field(default_factory=dict)


class EmbeddingStore(StoreMaintenance):
    """Embedding tables on disk, with vectorized lookup and optimizer steps.

    Args:
        path: store directory (created if missing). ``None`` together with
            ``storage=MemoryStorage()`` gives a purely in-memory store.
        tables: table configs. Tables already in the store keep their rows;
            their dim and optimizer kind must match, and another setting
            (learning rate, initializer, ...) changes only with
            ``StoreConfig(allow_config_change=True)``, which logs each change.
        config: RocksDB options and cache budgets.
        read_only: open without the write lock (``inspect`` while training).
        storage: a storage backend to use instead of RocksDB (tests).

    Raises:
        StoreLockedError: another process or handle has the store open.
        ConfigConflictError: a table's config, or the TTL mode, differs from
            what is stored (see ``tables``).

    Example:
        >>> import numpy as np, tempfile
        >>> from damo_hybrid import EmbeddingStore, TableConfig, OptimizerConfig
        >>> with EmbeddingStore(tempfile.mkdtemp(), [TableConfig("item", 4, optimizer=OptimizerConfig.sgd(0.1))]) as s:
        ...     keys = np.array([1, 2, 2**64 - 1], dtype=np.uint64)
        ...     s.apply_gradients("item", keys, np.ones((3, 4), np.float32))
        ...     s.lookup("item", keys).shape
        (3, 4)
    """

    def __init__(self, path: str | os.PathLike[str] | None, tables: Sequence[TableConfig] = (),
                 config: StoreConfig = StoreConfig(), *, read_only: bool = False, storage: Storage | None = None) -> None:
        if not isinstance(config, StoreConfig):
            raise TypeError(f"config must be a StoreConfig, got {type(config).__name__}")
        tables = list(tables)
        for t in tables:
            if not isinstance(t, TableConfig):
                raise TypeError(f"tables must hold TableConfig objects, got {type(t).__name__}")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        self._lock = threading.RLock()
        self._closed = False
        self.read_only = read_only
        self.config = config
        self.root: Path | None = Path(path) if path is not None else None
        if storage is None and self.root is None:
            raise ValueError("path is required unless a storage backend is given")
        # the store a killed swap set aside comes back; a folder made here goes if the open fails
        with store_root(self.root if storage is None else None, read_only, config.ttl_seconds) as found:
            self.root = found or self.root
            self._storage: Storage = storage if storage is not None else RocksDBStorage(
                os.path.join(found or "", "db"), config, read_only=read_only)
            try:
                meta = read_meta(self.root) if self.root is not None else None  # re-read under the RocksDB lock
                if meta is not None:
                    check_ttl(meta, self.root, config.ttl_seconds)
                self._tables, self._next_id, _ = load_tables(meta, tables, self.root, config.allow_config_change)
                self._filters = open_filters(self._storage, self._tables.values(), meta, self.root,
                                             config.key_filter_mb << 20, read_only, trust_saved=storage is None)
                if not read_only:
                    self._write_meta()  # marks the store live until close()
            except BaseException:
                self._storage.close()
                raise
        self._io = RowIO(self._storage, self._filters, config.write_ahead_log or config.sync_writes)
        self._caches = TierRegistry(self._io, config)

    # --------------------------------------------------------------- registry
    def _write_meta(self, root: Path | None = None, live: bool | None = None) -> None:
        """``meta.json`` of the store (live unless closing) or of a checkpoint at ``root``."""
        if live is None:
            live = root is None
        root = root or self.root
        if root is not None:
            write_meta(root, self._tables.values(), self._next_id, self.config.ttl_seconds is not None, live,
                       self._filters)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise DamoHybridError("the store was opened read_only")

    def _table(self, name: str) -> Table:
        try:
            return self._tables[name]
        except KeyError:
            raise UnknownTableError(
                f"unknown table {name!r}; this store holds {sorted(self._tables)}. "
                "Pass its TableConfig when opening the store, or call add_table()."
            ) from None

    def table(self, name: str) -> Table:
        """The runtime :class:`~damo_hybrid.rows.table.Table` of a table: its initializer,
        optimizer, schedule and global step (for code that steps rows itself).

        Raises:
            UnknownTableError: no such table.
        """
        with self._lock:
            return self._table(name)

    @property
    def tables(self) -> dict[str, TableConfig]:
        """The configs of every table, by name."""
        return {n: t.cfg for n, t in self._tables.items()}

    def add_table(self, config: TableConfig) -> None:
        """Register a table (or check an existing one for compatibility).

        Raises:
            ConfigConflictError: another config without ``StoreConfig.allow_config_change``
                (or an incompatible one), or a change of a cached table.
        """
        with self._lock:
            self._check_writable()
            if not isinstance(config, TableConfig):
                raise TypeError(f"config must be a TableConfig, got {type(config).__name__}")
            old = self._tables.get(config.name)
            if old is not None:
                if not check_change(old.cfg, config, self.config.allow_config_change):
                    return
                if self._caches.get(config.name) is not None:
                    raise ConfigConflictError(f"table {config.name!r} has a cache; change its config after "
                                              "closing the store")
                self._tables[config.name] = Table(old.id, config, old.step, old.rows,
                                                  old.filter.counters if old.filter and config.admission else None)
            else:
                t = self._tables[config.name] = Table(self._next_id, config)
                if self.config.key_filter_mb:  # rows may sit under this id (a storage handed in): scan it
                    self._filters[t.id] = StoredKeyFilter(self.config.key_filter_mb << 20)
                    recount_rows(self._storage, [t], self._filters)
                self._next_id += 1
            self._write_meta()

    # ----------------------------------------------------------------- tiers
    def cache(self, tables: Sequence[str], *, cache_mb: float | None = None, device_cache_mb: float | None = None,
              device: Any = None, min_cache_rows: int | None = None) -> dict[str, TableTiers]:
        """The cache tiers of ``tables``, created where a table has none yet.

        Budgets are split across the tables being created in proportion to their row bytes
        (equal row counts), at least ``StoreConfig.min_cache_rows`` rows each. A table that
        already has tiers keeps them, whatever this call asks: the first creation wins, and a
        different budget is logged as ignored.

        Args:
            tables: table names.
            cache_mb: host-tier budget; default ``StoreConfig.cache_mb``.
            device_cache_mb: device-tier budget; default ``StoreConfig.device_cache_mb``, and
                2048 MiB when ``device`` is a GPU.
            device: ``torch.device`` of the device tier; None for the host tier only.
            min_cache_rows: floor of rows per table and tier; default ``StoreConfig.min_cache_rows``.
        Returns:
            name -> :class:`~damo_hybrid.cache.tiers.TableTiers`.
        Raises:
            ConfigConflictError: a table is cached already on another device (or without one).
            ValueError: a bad budget.
        """
        with self._lock:
            self._check_open()
            return self._caches.cache([self._table(n) for n in dict.fromkeys(tables)], cache_mb,
                                      device_cache_mb, device, min_cache_rows)

    def cache_table(self, table: str, rows: int, device_rows: int | None = None, device: Any = None) -> TableTiers:
        """The tiers of one table with exact slot counts (created if missing; existing tiers win).

        Args:
            table: table name.
            rows: host-tier slots.
            device_rows: device-tier slots, or None for no device tier.
            device: the device tier's ``torch.device`` (default ``cpu``: the tier's logic in host memory).
        """
        with self._lock:
            self._check_open()
            return self._caches.cache_table(self._table(table), rows, device_rows, device)

    def tiers(self, table: str) -> TableTiers | None:
        """The table's cache tiers, or None where it is not cached."""
        with self._lock:
            return self._caches.get(self._table(table).name)

    def cache_stats(self) -> dict[str, tuple[CacheStats, CacheStats | None]]:
        """Per cached table: ``(host tier stats, device tier stats or None)``."""
        with self._lock:
            return self._caches.stats()

    # ------------------------------------------------------------- batch API
    def lookup(self, table: str, keys: np.ndarray) -> np.ndarray:
        """Current weights of ``keys``, in whatever tier they are; read-only.

        A key never stored returns its deterministic initial row (or zeros,
        for a table whose admission says so) and nothing is written.

        Args:
            table: table name.
            keys: uint64 (N,) (int64 is read as the same bits). Duplicates allowed.
        Returns:
            float32 (N, dim).
        Raises:
            UnknownTableError, TypeError, ValueError, CorruptRowError.
        """
        keys = as_keys(keys)
        with self._lock:
            self._check_open()
            t = self._table(table)
            if len(keys) == 0:
                return np.zeros((0, t.dim), dtype=np.float32)
            ukeys, inv = unique_inverse(keys)
            rows, found = self._read(t, ukeys)
            out = np.empty((len(ukeys), t.dim), dtype=np.float32)
            out[found] = rows.weights
            missing = ~found
            if missing.any():
                out[missing] = 0.0 if t.unadmitted_zeros else t.initial_weights(ukeys[missing])
            return out[inv]

    def _read(self, t: Table, ukeys: np.ndarray) -> tuple[Rows, np.ndarray]:
        tiers = self._caches.get(t.name)
        return tiers.read_rows(ukeys) if tiers is not None else self._io.read(t, ukeys)

    def read_rows(self, table: str, keys: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Newest full rows (weights, optimizer state, metadata) of distinct keys, in whatever
        tier they are.

        Args:
            table: table name.
            keys: uint64 (N,) distinct keys.
        Returns:
            ``(rows, found)``: rows of the M found keys in order, bool (N,).
        """
        keys = as_keys(keys)
        with self._lock:
            self._check_open()
            return self._read(self._table(table), keys)

    def apply_gradients(self, table: str, keys: np.ndarray, grads: np.ndarray, step: int | None = None) -> None:
        """One optimizer step on the rows of ``keys``.

        Gradients of repeated keys are summed (in order of appearance, in
        float32) and the row is stepped once. Unseen keys start from their
        initial row. Keys not yet admitted are counted and their gradients
        dropped. On a table without a cache the whole call is written in one
        atomic RocksDB batch; on a cached table the rows are stepped in its
        tiers and reach disk on flush, checkpoint or close.

        Args:
            table: table name.
            keys: uint64 (N,) (int64 read as the same bits).
            grads: float32 (N, dim).
            step: global step for the learning-rate schedule; default: the
                table's own counter, which every call advances by one.
        Raises:
            NonFiniteGradientError: NaN/Inf in a gradient, or in a stepped row
                (``NonFiniteUpdateError``), under ``raise``; nothing was written.
            TypeError, ValueError: wrong dtype or shape; nothing was written.
            OutOfSpaceError: disk full; nothing was written.
            WriteBackError: a cached table's writer failed earlier; nothing was written.
            RuntimeError: a cached row is pinned on the device tier by a batch in flight.
        """
        with self._lock:
            self._check_writable()
            t = self._table(table)
            keys, grads, finite = t.check_gradients(keys, grads)
            lr = t.lr(step)
            if finite is not None:
                keys, grads = keys[finite], grads[finite]
            tiers = self._caches.get(table)
            if tiers is not None:
                kept = tiers.step_rows(keys, grads, lr)
            else:
                kept = [self._io.step(t, keys, grads, lr)] if len(keys) else []
            t.count_dropped(finite, *kept)
            t.advance()

    def delete(self, table: str, keys: np.ndarray) -> None:
        """Remove rows from every tier (they return to their initial value). Absent keys are ignored.

        Args:
            table: table name.
            keys: uint64 (N,).
        """
        keys = as_keys(keys)
        with self._lock:
            self._check_writable()
            t = self._table(table)
            self._caches.delete(table, np.unique(keys), lambda k: self._io.delete(t, k))

    # ------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Send every cached update down to the storage, then persist rows (RocksDB flush +
        WAL sync), step counters and admission counts.

        Raises:
            WriteBackError: the storage refused cached rows; they are still in memory.
        """
        with self._lock:
            self._check_open()
            if self.read_only:
                return
            self._caches.flush()
            self._io.flush()
            self._write_meta()

    def close(self) -> None:
        """Flush every tier and release the store. Closing twice is a no-op.

        Raises:
            WriteBackError: cached rows could not be written; the store stays open and keeps
                them in memory, so fix the cause (free disk space, say) and call close() again.
            OutOfSpaceError, DamoHybridError: RocksDB could not flush the rows written back
                (not in the WAL): the store stays open; fix the cause and call close() again.
        """
        with self._lock:
            if self._closed:
                return
            if not self.read_only:
                self._caches.flush()  # on failure: still open, rows still in memory
            self._caches.seal()  # nothing changes a row after this: the key filters saved next hold
            if not self.read_only and self._io.unlogged_pending:
                self._io.flush()  # write-backs without the WAL live in the memtable: on failure, stay open
            try:
                if not self.read_only:
                    self._io.flush()
                    self._write_meta(live=False)
            except BaseException:
                # the first error is the one to report; the handle is released either way (rows are on disk or in the WAL)
                self._closed = True
                try:
                    self._storage.close()
                except DamoHybridError:
                    pass
                raise
            self._closed = True
            self._caches.clear()
            self._storage.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> StoreStats:
        """Counters; see :class:`StoreStats`."""
        with self._lock:
            self._check_open()
            ts = list(self._tables.values())
            per = {t.name: t.rows for t in ts}

            def total(attr: str) -> int:
                return sum(getattr(t.counters, attr) for t in ts)

            return StoreStats(
                rows=sum(per.values()), disk_bytes=self._storage.disk_bytes(), hits=total("hits"),
                misses=total("misses"), writes=total("writes"), dropped_nonfinite=total("dropped_nonfinite"),
                dropped_unadmitted=total("dropped_unadmitted"), table_rows=per,
            )

    def step(self, table: str) -> int:
        """The table's global step (number of steps applied to it so far)."""
        with self._lock:
            return self._table(table).step

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str],
        path: str | os.PathLike[str],
        tables: Sequence[TableConfig] = (),
        config: StoreConfig = StoreConfig(),
    ) -> EmbeddingStore:
        """Open a new store at ``path`` holding a copy of a checkpoint.

        The checkpoint itself is never modified, so it can be restored again.

        Raises:
            DamoHybridError: ``checkpoint`` is incomplete (no marker) or not a checkpoint.
            FileExistsError: ``path`` exists and is not empty.
        """
        return restore_checkpoint(Path(checkpoint), Path(path), lambda: cls(path, tables, config))


def open_memory_store(tables: Sequence[TableConfig] = (), config: StoreConfig = StoreConfig()) -> EmbeddingStore:
    """An in-memory store over :class:`MemoryStorage` (the reference model)."""
    return EmbeddingStore(None, tables, config, storage=MemoryStorage())
