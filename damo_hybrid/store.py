"""The embedding store: many tables of rows in RocksDB, with a numpy batch API.

Layout of a store directory::

    meta.json          tables (id, config, global step, row count), format, TTL mode
    admission/<id>.npy counting-Bloom counters of tables with admission
    db/                the RocksDB database (rows)

RocksDB's own LOCK file makes a second writer fail with
:class:`~damo_hybrid.errors.StoreLockedError`; ``meta.json`` and the admission
files are written atomically (temp file, fsync, rename) and only by the
lock holder. A crash loses at most the global-step counters, row counts and
admission counts since the last ``flush()``/``checkpoint()``; rows themselves
are in RocksDB's write-ahead log.

Thread safety: one store may be shared between threads; every public method
takes the store's lock.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import operator
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_file, fsync_dir
from .admission import CountingBloomFilter
from .config import NonFinitePolicy, StoreConfig, TableConfig
from .errors import (
    ConfigConflictError,
    DamoHybridError,
    NonFiniteGradientError,
    StoreClosedError,
    UnknownTableError,
)
from .hashing import as_keys
from .initializers import RowInitializer
from .ops.cpu import reduce_by_key
from .optimizers import RowOptimizer, state_width
from .rows import RowCodec, Rows
from .storage import MemoryStorage, RocksDBStorage, Storage

__all__ = ["EmbeddingStore", "StoreStats"]

log = logging.getLogger(__name__)

META_FORMAT = 1
_META = "meta.json"
_MARKER = "CHECKPOINT.json"
_DAY = 86400.0


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was opened (rows and bytes: current totals).

    Attributes:
        rows: stored rows per the store's running count (exact unless the
            process crashed since the last flush, or RocksDB's TTL mode
            dropped rows; ``count_rows`` scans for the exact number).
        disk_bytes: RocksDB's SST + memtable size.
        hits: unique keys found on disk by lookup/apply_gradients.
        misses: unique keys not stored (new or never admitted).
        writes: rows written.
        dropped_nonfinite: gradient rows dropped for NaN/Inf (``skip`` policy).
        dropped_unadmitted: unique keys whose gradients were dropped because
            admission had not yet let them in.
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


class _Table:
    """Runtime state of one table, decomposed from its config once."""

    def __init__(self, tid: int, cfg: TableConfig, step: int, rows: int, counters: np.ndarray | None) -> None:
        self.id = tid
        self.cfg = cfg
        self.name = cfg.name
        self.dim = cfg.dim
        self.init = RowInitializer(cfg.initializer, cfg.name, cfg.dim)
        self.opt = RowOptimizer(cfg.optimizer, cfg.dim)
        self.codec = RowCodec(cfg.name, cfg.dim, self.opt.width)
        self.step = step
        self.rows = rows
        self.skip_nonfinite = cfg.nonfinite is NonFinitePolicy.SKIP
        adm = cfg.admission
        self.filter = CountingBloomFilter.from_config(adm, counters) if adm is not None else None
        self.min_count = adm.min_count if adm is not None else 0
        self.unadmitted_zeros = adm is not None and adm.unadmitted_value == "zeros"


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def _read_meta(root: Path) -> dict[str, Any] | None:
    p = root / _META
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DamoHybridError(f"store metadata {p} is unreadable: {e}; restore it from a checkpoint") from e
    if meta.get("format") != META_FORMAT:
        raise DamoHybridError(f"store metadata {p} has format {meta.get('format')!r}, this version reads {META_FORMAT}")
    return meta


class EmbeddingStore:
    """Embedding tables on disk, with vectorized lookup and optimizer steps.

    Args:
        path: store directory (created if missing). ``None`` together with
            ``storage=MemoryStorage()`` gives a purely in-memory store.
        tables: table configs. Tables already in the store keep their rows;
            their dim and optimizer kind must match, other settings (learning
            rate, initializer, ...) may change between runs.
        config: RocksDB options (TTL, caches).
        read_only: open without the write lock (``inspect`` while training).
        storage: a storage backend to use instead of RocksDB (tests).

    Raises:
        StoreLockedError: another process or handle has the store open.
        ConfigConflictError: a table's dim or optimizer layout, or the TTL
            mode, differs from what is stored.

    Example:
        >>> import numpy as np, tempfile
        >>> from damo_hybrid import EmbeddingStore, TableConfig, OptimizerConfig
        >>> with EmbeddingStore(tempfile.mkdtemp(), [TableConfig("item", 4, optimizer=OptimizerConfig.sgd(0.1))]) as s:
        ...     keys = np.array([1, 2, 2**64 - 1], dtype=np.uint64)
        ...     s.apply_gradients("item", keys, np.ones((3, 4), np.float32))
        ...     s.lookup("item", keys).shape
        (3, 4)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        tables: Sequence[TableConfig] = (),
        config: StoreConfig = StoreConfig(),
        *,
        read_only: bool = False,
        storage: Storage | None = None,
    ) -> None:
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
        self._hits = self._misses = self._writes = 0
        self._dropped_nonfinite = self._dropped_unadmitted = 0
        if storage is not None:
            self._storage: Storage = storage
            meta = _read_meta(self.root) if self.root is not None else None
        else:
            if self.root is None:
                raise ValueError("path is required unless a storage backend is given")
            if read_only and not (self.root / _META).exists():
                raise FileNotFoundError(f"no store at {self.root} (missing {_META})")
            pre = _read_meta(self.root) if self.root.exists() else None
            if pre is not None:
                self._check_ttl(pre)
            self.root.mkdir(parents=True, exist_ok=True)
            self._storage = RocksDBStorage(str(self.root / "db"), config, read_only=read_only)
            try:
                meta = _read_meta(self.root)  # re-read under the RocksDB lock
            except BaseException:
                self._storage.close()
                raise
        try:
            self._load(meta, tables)
        except BaseException:
            self._storage.close()
            raise

    # ------------------------------------------------------------------ meta
    def _check_ttl(self, meta: dict[str, Any]) -> None:
        stored = bool(meta.get("ttl", False))
        if stored != (self.config.ttl_seconds is not None):
            want = "with" if stored else "without"
            raise ConfigConflictError(
                f"store {self.root} was created {want} a TTL; reopen it {want} StoreConfig.ttl_seconds "
                "(RocksDB's TTL mode changes the stored value format)"
            )

    def _load(self, meta: dict[str, Any] | None, tables: list[TableConfig]) -> None:
        self._tables: dict[str, _Table] = {}
        self._next_id = 1
        if meta is not None:
            self._check_ttl(meta)
            self._next_id = int(meta["next_table_id"])
            given = {t.name: t for t in tables}
            for name, entry in meta["tables"].items():
                stored = TableConfig.from_dict(entry["config"])
                cfg = given.pop(name, None)
                if cfg is None:
                    cfg = stored
                else:
                    self._check_compatible(stored, cfg)
                counters = self._load_counters(int(entry["id"]), cfg)
                self._tables[name] = _Table(int(entry["id"]), cfg, int(entry["step"]), int(entry["rows"]), counters)
            new = list(given.values())
        else:
            new = tables
        for cfg in new:
            self._tables[cfg.name] = _Table(self._next_id, cfg, 0, 0, None)
            self._next_id += 1
        if not self.read_only and (new or meta is None or any(
                t.cfg.to_dict() != meta["tables"][t.name]["config"] for t in self._tables.values()
                if t.name in meta["tables"])):
            self._write_meta()

    def _check_compatible(self, stored: TableConfig, cfg: TableConfig) -> None:
        if stored.dim != cfg.dim:
            raise ConfigConflictError(
                f"table {cfg.name!r} is stored with dim={stored.dim}, opened with dim={cfg.dim}; "
                "use a new table name for a different dim"
            )
        sk, ck = stored.optimizer.kind, cfg.optimizer.kind
        if sk != ck:
            raise ConfigConflictError(
                f"table {cfg.name!r} is stored with optimizer {sk.value!r} "
                f"({state_width(sk, stored.dim)} state floats per row), opened with {ck.value!r} "
                f"({state_width(ck, cfg.dim)}); the stored optimizer state cannot be reused"
            )
        sa, ca = stored.admission, cfg.admission
        if sa is not None and ca is not None and (sa.capacity, sa.fpr) != (ca.capacity, ca.fpr):
            raise ConfigConflictError(
                f"table {cfg.name!r} has admission counters sized for capacity={sa.capacity}, fpr={sa.fpr}; "
                f"opened with capacity={ca.capacity}, fpr={ca.fpr}"
            )

    def _load_counters(self, tid: int, cfg: TableConfig) -> np.ndarray | None:
        if cfg.admission is None or self.root is None:
            return None
        p = self.root / "admission" / f"{tid}.npy"
        if not p.exists():
            return None
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DamoHybridError(f"admission counters {p} are unreadable: {e}") from e

    def _meta_dict(self) -> dict[str, Any]:
        return {
            "format": META_FORMAT,
            "ttl": self.config.ttl_seconds is not None,
            "next_table_id": self._next_id,
            "tables": {
                t.name: {"id": t.id, "config": t.cfg.to_dict(), "step": t.step, "rows": t.rows}
                for t in self._tables.values()
            },
        }

    def _write_meta(self, root: Path | None = None) -> None:
        root = root or self.root
        if root is None:
            return
        adm = root / "admission"
        for t in self._tables.values():
            if t.filter is not None:
                adm.mkdir(exist_ok=True)
                with atomic_file(adm / f"{t.id}.npy") as f:
                    np.save(f, t.filter.counters, allow_pickle=False)
        _atomic_write(root / _META, json.dumps(self._meta_dict(), indent=1, sort_keys=True).encode())

    # --------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise DamoHybridError("the store was opened read_only")

    def _table(self, name: str) -> _Table:
        try:
            return self._tables[name]
        except KeyError:
            raise UnknownTableError(
                f"unknown table {name!r}; this store holds {sorted(self._tables)}. "
                "Pass its TableConfig when opening the store, or call add_table()."
            ) from None

    @property
    def tables(self) -> dict[str, TableConfig]:
        """The configs of every table, by name."""
        return {n: t.cfg for n, t in self._tables.items()}

    def add_table(self, config: TableConfig) -> None:
        """Register a table (or check an existing one for compatibility).

        Raises:
            ConfigConflictError: the name exists with another dim or optimizer.
        """
        with self._lock:
            self._check_writable()
            if not isinstance(config, TableConfig):
                raise TypeError(f"config must be a TableConfig, got {type(config).__name__}")
            old = self._tables.get(config.name)
            if old is not None:
                self._check_compatible(old.cfg, config)
                if old.cfg == config:
                    return
                self._tables[config.name] = _Table(old.id, config, old.step, old.rows,
                                                   old.filter.counters if old.filter and config.admission else None)
            else:
                self._tables[config.name] = _Table(self._next_id, config, 0, 0, None)
                self._next_id += 1
            self._write_meta()

    def _read(self, t: _Table, ukeys: np.ndarray) -> tuple[Rows, np.ndarray]:
        rows, found = t.codec.decode(ukeys, self._storage.get(t.id, ukeys))
        nf = int(found.sum())
        self._hits += nf
        self._misses += len(ukeys) - nf
        return rows, found

    # ------------------------------------------------------------- batch API
    def lookup(self, table: str, keys: np.ndarray) -> np.ndarray:
        """Current weights of ``keys``; read-only.

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
            ukeys, inv = np.unique(keys, return_inverse=True)
            rows, found = self._read(t, ukeys)
            out = np.empty((len(ukeys), t.dim), dtype=np.float32)
            out[found] = rows.weights
            missing = ~found
            if missing.any():
                out[missing] = 0.0 if t.unadmitted_zeros else t.init(ukeys[missing])
            return out[inv]

    def read_rows(self, table: str, keys: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Full stored rows (weights, optimizer state, metadata) of distinct keys.

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
        dropped. The whole call is written in one atomic RocksDB batch.

        Args:
            table: table name.
            keys: uint64 (N,) (int64 read as the same bits).
            grads: float32 (N, dim).
            step: global step for the learning-rate schedule; default: the
                table's own counter, which every call advances by one.
        Raises:
            NonFiniteGradientError: a gradient row holds NaN/Inf and the
                table's policy is ``raise``; nothing was written.
            TypeError, ValueError: wrong dtype or shape; nothing was written.
            OutOfSpaceError: disk full; nothing was written.
        """
        with self._lock:
            keys, grads, lr = self.begin_step(table, keys, grads, step)
            if len(keys):
                self._step_rows(self._tables[table], keys, grads, lr)
            self.end_step(table)

    def begin_step(self, table: str, keys: np.ndarray, grads: np.ndarray,
                   step: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Validate one step's gradients and give its learning rate.

        The shared front half of every ``apply_gradients`` (the store's and the caches'):
        checks dtypes and shapes, applies the table's NaN/Inf policy and returns the
        scheduled learning rate. Call :meth:`end_step` once the rows are updated, so a
        step that failed half-way does not advance the schedule.

        Args:
            table: table name.
            keys: uint64 (N,) (int64 read as the same bits).
            grads: float32 (N, dim).
            step: global step for the schedule; default: the table's own counter.
        Returns:
            ``(keys uint64 (M,), grads float32 (M, dim), lr)`` with non-finite rows dropped
            under the ``skip`` policy (M <= N).
        Raises:
            NonFiniteGradientError, TypeError, ValueError: nothing was changed.
        """
        keys = as_keys(keys)
        if not isinstance(grads, np.ndarray):
            raise TypeError(f"grads must be a numpy float32 array, got {type(grads).__name__}")
        if grads.dtype != np.float32:
            raise TypeError(f"grads must have dtype float32, got {grads.dtype}")
        with self._lock:
            self._check_writable()
            t = self._table(table)
            if grads.shape != (len(keys), t.dim):
                raise ValueError(f"grads must have shape ({len(keys)}, {t.dim}) for table {table!r}, got {grads.shape}")
            lr = self.step_lr(table, step)  # validates step (the lock is re-entrant)
            finite = np.isfinite(grads).all(axis=1)
            if not finite.all():
                bad = int(np.count_nonzero(~finite))
                if not t.skip_nonfinite:
                    i = int(np.nonzero(~finite)[0][0])
                    raise NonFiniteGradientError(
                        f"{bad} gradient row(s) of table {table!r} hold NaN or Inf (first at position {i}, "
                        f"key {int(keys[i])}); nothing was written. Use nonfinite='skip' to drop such rows."
                    )
                self._dropped_nonfinite += bad
                keys, grads = keys[finite], grads[finite]
            return keys, grads, lr

    def step_lr(self, table: str, step: int | None = None) -> float:
        """The scheduled learning rate of the table's next step, for callers that validated
        their gradients themselves (the device cache checks finiteness on the device).

        Raises:
            ValueError: a negative or non-integer ``step``; DamoHybridError: a closed or read-only store.
        """
        with self._lock:
            self._check_writable()
            t = self._table(table)
            if step is not None and (not isinstance(step, (int, np.integer)) or step < 0):
                raise ValueError(f"step must be a non-negative int, got {step!r}")
            return t.opt.lr(t.step if step is None else int(step))

    def end_step(self, table: str) -> None:
        """Advance the table's global step (after a successful update)."""
        with self._lock:
            self._table(table).step += 1

    def table_ops(self, table: str) -> tuple[RowInitializer, RowOptimizer]:
        """The table's row initializer and optimizer (for caches that step rows themselves)."""
        with self._lock:
            t = self._table(table)
            return t.init, t.opt

    def write_rows(self, table: str, keys: np.ndarray, rows: Rows, new: np.ndarray) -> None:
        """Store full rows (a cache's write-back) in one atomic batch.

        Args:
            table: table name.
            keys: uint64 (N,) distinct.
            rows: N rows.
            new: bool (N,) rows known not to be stored yet (keeps the row count exact).
        """
        keys = as_keys(keys)
        with self._lock:
            self._check_writable()
            t = self._table(table)
            if len(keys):
                self._storage.put(t.id, keys, t.codec.encode(keys, rows))
                self._writes += len(keys)
                t.rows += int(np.count_nonzero(new))

    def _step_rows(self, t: _Table, keys: np.ndarray, grads: np.ndarray, lr: float) -> None:
        ukeys, inv = np.unique(keys, return_inverse=True)
        if len(ukeys) == len(keys):
            g = np.empty_like(grads)
            g[inv] = grads
        else:
            g = reduce_by_key(grads, inv, len(ukeys))
        occurrences = None
        if t.filter is not None:
            occurrences = np.bincount(inv, minlength=len(ukeys))
            admitted = t.filter.count(ukeys) + occurrences >= t.min_count
            if not admitted.all():
                self._dropped_unadmitted += int(np.count_nonzero(~admitted))
                self._misses += int(np.count_nonzero(~admitted))
                wkeys, g = ukeys[admitted], g[admitted]
            else:
                wkeys = ukeys
        else:
            wkeys = ukeys
        now = int(time.time())
        n = len(wkeys)
        if n:
            rows, found = self._read(t, wkeys)
            w = np.empty((n, t.dim), dtype=np.float32)
            st = np.empty((n, t.opt.width), dtype=np.float32)
            count = np.zeros(n, dtype=np.int64)
            created = np.full(n, now, dtype=np.int64)
            w[found], st[found] = rows.weights, rows.state
            count[found], created[found] = rows.count, rows.created
            new = ~found
            n_new = int(np.count_nonzero(new))
            if n_new:
                w[new] = t.init(wkeys[new])
                st[new] = t.opt.initial_state(n_new)
            count += 1
            t.opt.update(w, st, g, count, lr)
            values = t.codec.encode(wkeys, Rows(w, st, count, created, np.full(n, now, dtype=np.int64)))
            self._storage.put(t.id, wkeys, values)
            self._writes += n
            t.rows += n_new
        if t.filter is not None:
            assert occurrences is not None
            t.filter.add(ukeys, occurrences)

    def delete(self, table: str, keys: np.ndarray) -> None:
        """Remove rows (they return to their initial value). Absent keys are ignored.

        Args:
            table: table name.
            keys: uint64 (N,).
        """
        keys = as_keys(keys)
        with self._lock:
            self._check_writable()
            t = self._table(table)
            ukeys = np.unique(keys)
            present = np.fromiter(map(operator.is_not, self._storage.get(t.id, ukeys), repeat(None)), bool, len(ukeys))
            self._storage.delete(t.id, ukeys)
            t.rows = max(0, t.rows - int(present.sum()))

    # ------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Persist rows (RocksDB flush + WAL sync), step counters and admission counts."""
        with self._lock:
            self._check_open()
            if self.read_only:
                return
            self._storage.flush()
            self._write_meta()

    def close(self) -> None:
        """Flush and release the store. Closing twice is a no-op."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self.read_only:
                    self._storage.flush()
                    self._write_meta()
            except BaseException:
                # the first error is the one to report; the handle is released either way
                self._closed = True
                try:
                    self._storage.close()
                except DamoHybridError:
                    pass
                raise
            self._closed = True
            self._storage.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> StoreStats:
        """Counters; see :class:`StoreStats`."""
        with self._lock:
            self._check_open()
            per = {n: t.rows for n, t in self._tables.items()}
            return StoreStats(
                rows=sum(per.values()),
                disk_bytes=self._storage.disk_bytes(),
                hits=self._hits,
                misses=self._misses,
                writes=self._writes,
                dropped_nonfinite=self._dropped_nonfinite,
                dropped_unadmitted=self._dropped_unadmitted,
                table_rows=per,
            )

    def step(self, table: str) -> int:
        """The table's global step (number of apply_gradients calls so far)."""
        with self._lock:
            return self._table(table).step

    # ------------------------------------------------------------- scanning
    def scan(self, table: str, batch: int = 65536) -> Iterator[tuple[np.ndarray, Rows]]:
        """Every stored row of a table in key order.

        Yields:
            ``(keys uint64 (M,), rows)`` chunks of at most ``batch`` rows.
        """
        with self._lock:
            self._check_open()
            t = self._table(table)
        for keys, values in self._storage.scan(t.id, batch):
            rows, _ = t.codec.decode(keys, values)
            yield keys, rows

    def count_rows(self, table: str) -> int:
        """Exact number of stored rows (a full scan of the table)."""
        return sum(len(k) for k, _ in self.scan(table))

    def _select(self, tables: Iterable[str] | None) -> list[str]:
        if tables is None:
            return list(self._tables)
        names = [tables] if isinstance(tables, str) else list(tables)
        for n in names:
            self._table(n)
        return names

    def expire(
        self,
        older_than: _dt.timedelta | None = None,
        min_count: int | None = None,
        tables: Iterable[str] | None = None,
        now: float | None = None,
    ) -> int:
        """Delete stale rows; they return to their initial value if seen again.

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
            for name in self._select(tables):
                t = self._tables[name]
                if older_than is None and min_count is None:
                    exp = t.cfg.expiry
                    if exp is None:
                        continue
                    age = exp.max_age_days * _DAY if exp.max_age_days is not None else None
                    mc = exp.min_count
                else:
                    age = older_than.total_seconds() if older_than is not None else None
                    mc = min_count or 0
                doomed = [k[stale_mask(rows, now, age, mc)] for k, rows in self.scan(name)]
                if doomed:
                    dk = np.concatenate(doomed)
                    if len(dk):
                        self._storage.delete(t.id, dk)
                        t.rows = max(0, t.rows - len(dk))
                        removed += len(dk)
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
        arrays: dict[str, np.ndarray] = {}
        written: dict[str, int] = {}
        with self._lock:
            self._check_open()
            for name in self._select(tables):
                t = self._tables[name]
                ks, ws, cs, us = [np.zeros(0, np.uint64)], [np.zeros((0, t.dim), np.float32)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
                for k, rows in self.scan(name):
                    keep = ~stale_mask(rows, now, age, min_count)
                    ks.append(k[keep])
                    ws.append(rows.weights[keep])
                    cs.append(rows.count[keep])
                    us.append(rows.updated[keep])
                arrays[f"keys_{name}"] = np.concatenate(ks)
                arrays[f"weights_{name}"] = np.concatenate(ws)
                arrays[f"counts_{name}"] = np.concatenate(cs)
                arrays[f"updated_{name}"] = np.concatenate(us)
                written[name] = len(arrays[f"keys_{name}"])
        with atomic_file(path) as f:
            np.savez(f, **arrays)
        return written

    def compact(self) -> None:
        """Full RocksDB compaction: reclaims deleted rows, applies TTL."""
        with self._lock:
            self._check_writable()
            compact = getattr(self._storage, "compact", None)
            if compact is not None:
                compact()

    def wait_for_compactions(self, timeout: float = 300.0) -> float:
        """Wait until RocksDB's background compactions are done (benchmarks use
        this to measure a settled store). Returns the seconds waited."""
        with self._lock:
            self._check_open()
            wait = getattr(self._storage, "wait_for_compactions", None)
        return float(wait(timeout)) if wait is not None else 0.0

    def running_compactions(self) -> int:
        """Background compactions running now (0 for the memory backend); for benchmarks."""
        with self._lock:
            self._check_open()
            f = getattr(self._storage, "running_compactions", None)
        return int(f()) if f is not None else 0

    # ----------------------------------------------------------- checkpoint
    def checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write a consistent, atomic snapshot of rows, counters and configs.

        The snapshot is built in a hidden sibling directory and renamed into
        place only when complete, with a ``CHECKPOINT.json`` marker written
        last; an interrupted checkpoint leaves no directory at ``path``.
        RocksDB hard-links its immutable files, so this is cheap.

        Args:
            path: the checkpoint directory; must not exist yet.
        Returns:
            The checkpoint path.
        """
        dst = Path(path)
        with self._lock:
            self._check_writable()
            if self.root is None:
                raise DamoHybridError("an in-memory store cannot be checkpointed; open it on a path")
            if dst.exists():
                raise FileExistsError(f"checkpoint path {dst} already exists; choose a new directory")
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._storage.flush()
            tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                self._storage.checkpoint(str(tmp / "db"))
                self._write_meta(tmp)
                marker = {"format": META_FORMAT, "created": time.time(), "tables": sorted(self._tables)}
                _atomic_write(tmp / _MARKER, json.dumps(marker).encode())
                for sub in (tmp / "db",):
                    _fsync_tree(sub)
                os.rename(tmp, dst)
                fsync_dir(dst.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._write_meta()
            return dst

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
        src, dst = Path(checkpoint), Path(path)
        if not (src / _MARKER).is_file() or not (src / _META).is_file():
            raise DamoHybridError(
                f"{src} is not a complete checkpoint (no {_MARKER}); an interrupted checkpoint is never used"
            )
        if dst.exists() and any(dst.iterdir()):
            raise FileExistsError(f"restore target {dst} is not empty")
        dst.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.restore-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(_MARKER))
            dst.rmdir()
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(dst, tables, config)


def dump_window(min_count: int, expire_days: float | None, now: float | None) -> tuple[float, float | None]:
    """Validate dump conditions; returns ``(now, max age in seconds or None)``."""
    if not isinstance(min_count, int) or min_count < 0:
        raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
    if expire_days is not None and not (isinstance(expire_days, (int, float)) and expire_days > 0):
        raise ValueError(f"expire_days must be None or > 0, got {expire_days!r}")
    return (time.time() if now is None else float(now)), (expire_days * _DAY if expire_days is not None else None)


def stale_mask(rows: Rows, now: float, age: float | None, min_count: int) -> np.ndarray:
    """bool (M,): rows older than ``age`` seconds or with fewer than ``min_count`` updates."""
    bad = rows.count < min_count
    if age is not None:
        bad |= rows.updated < now - age
    return bad


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def open_memory_store(tables: Sequence[TableConfig] = ()) -> EmbeddingStore:
    """An in-memory store over :class:`MemoryStorage` (the reference model)."""
    return EmbeddingStore(None, tables, storage=MemoryStorage())
