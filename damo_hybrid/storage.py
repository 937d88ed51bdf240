"""Byte-level row storage: RocksDB for real, a dict model for reference.

A storage maps ``(table_id, key)`` to an opaque row value. Keys on disk are 12
bytes: the table id as big-endian uint32, then the key as big-endian uint64,
so a table's rows are contiguous and sorted by key, and the full 64-bit key
space of every table is distinct.

Neither implementation is thread-safe; the store that owns one serialises
calls to it.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import rocksdict

from .config import StoreConfig
from .errors import DamoHybridError, OutOfSpaceError, StoreClosedError, StoreLockedError

__all__ = ["Storage", "MemoryStorage", "RocksDBStorage", "encode_keys"]

log = logging.getLogger(__name__)

_PARALLEL_MIN = 8192  # below this a multi-get is not worth splitting
_KEY_DTYPE = np.dtype([("table", ">u4"), ("key", ">u8")])


def encode_keys(table_id: int, keys: np.ndarray) -> list[bytes]:
    """12-byte storage keys.

    Args:
        table_id: the table's numeric id.
        keys: uint64 (N,).
    Returns:
        N byte strings.
    """
    arr = np.empty(len(keys), dtype=_KEY_DTYPE)
    arr["table"] = table_id
    arr["key"] = keys
    return arr.view("V12").tolist()


def _decode_keys(raw: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(raw), dtype=_KEY_DTYPE)["key"].astype(np.uint64)


class Storage(Protocol):
    """What the embedding store needs from a storage backend."""

    def get(self, table_id: int, keys: np.ndarray) -> list[bytes | None]:
        """Values of ``keys`` (uint64 (N,)); ``None`` where absent."""
        ...

    def put(self, table_id: int, keys: np.ndarray, values: list[bytes]) -> None:
        """Write N values atomically (all or nothing)."""
        ...

    def delete(self, table_id: int, keys: np.ndarray) -> None:
        """Remove keys atomically; absent keys are ignored."""
        ...

    def scan(self, table_id: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """All rows of a table in key order, as (uint64 keys (M,), M values) chunks."""
        ...

    def drop_table(self, table_id: int) -> None:
        """Remove every row of a table."""
        ...

    def flush(self) -> None:
        """Make every write durable."""
        ...

    def disk_bytes(self) -> int:
        """Approximate bytes used."""
        ...

    def checkpoint(self, path: str) -> None:
        """Write a consistent copy to ``path`` (which must not exist)."""
        ...

    def close(self) -> None:
        """Release the storage; later calls raise StoreClosedError."""
        ...


class MemoryStorage:
    """The reference model: a dict per table. Nothing is persisted.

    ``checkpoint`` writes a single ``.npz``-free pickle-free file of raw rows so
    that the store's checkpoint logic can be exercised against it too.
    """

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, bytes]] = {}
        self._closed = False

    def _t(self, table_id: int) -> dict[int, bytes]:
        if self._closed:
            raise StoreClosedError("storage is closed")
        return self._tables.setdefault(table_id, {})

    def get(self, table_id: int, keys: np.ndarray) -> list[bytes | None]:
        t = self._t(table_id)
        return [t.get(k) for k in keys.tolist()]

    def put(self, table_id: int, keys: np.ndarray, values: list[bytes]) -> None:
        t = self._t(table_id)
        t.update(zip(keys.tolist(), values))

    def delete(self, table_id: int, keys: np.ndarray) -> None:
        t = self._t(table_id)
        for k in keys.tolist():
            t.pop(k, None)

    def scan(self, table_id: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        t = self._t(table_id)
        ks = sorted(t)
        for i in range(0, len(ks), batch):
            chunk = ks[i:i + batch]
            yield np.array(chunk, dtype=np.uint64), [t[k] for k in chunk]

    def drop_table(self, table_id: int) -> None:
        self._t(table_id).clear()

    def flush(self) -> None:
        self._t(0)

    def disk_bytes(self) -> int:
        return sum(len(v) + 12 for t in self._tables.values() for v in t.values())

    def checkpoint(self, path: str) -> None:
        raise NotImplementedError("MemoryStorage keeps nothing on disk; checkpoint a RocksDB store")

    def close(self) -> None:
        self._closed = True


def _translate(e: Exception, path: str, action: str) -> DamoHybridError:
    msg = str(e)
    low = msg.lower()
    if "lock" in low and ("resource temporarily unavailable" in low or "no locks available" in low or "lock hold" in low):
        return StoreLockedError(
            f"store {path!r} is locked: another process or open handle is using it ({msg}). "
            "Close the other handle, or open a checkpoint copy instead."
        )
    if "no space left" in low or "enospc" in low:
        return OutOfSpaceError(
            f"disk full while trying to {action} store {path!r} ({msg}); the write was not applied. "
            "Free disk space and retry; data written before is intact."
        )
    if isinstance(e, rocksdict.DbClosedError):
        return StoreClosedError(f"store {path!r} is closed")
    return DamoHybridError(f"RocksDB failed to {action} store {path!r}: {msg}")


class RocksDBStorage:
    """Rows in RocksDB through rocksdict (raw bytes mode).

    Args:
        path: the RocksDB directory (created if missing).
        config: store options (TTL, caches, bloom filter).
        read_only: open without taking the write lock.
    Raises:
        StoreLockedError: another handle holds the database.
        DamoHybridError: RocksDB could not open it (corruption, permissions).
    """

    def __init__(self, path: str, config: StoreConfig = StoreConfig(), read_only: bool = False) -> None:
        self.path = path
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.increase_parallelism(max(2, os.cpu_count() or 2))
        opts.set_max_background_jobs(config.background_jobs)
        opts.set_write_buffer_size(config.write_buffer_mb << 20)
        # rows are mostly float32 noise: compression costs CPU on every read and saves little
        opts.set_compression_type(rocksdict.DBCompressionType.none())
        opts.set_allow_mmap_reads(config.mmap_reads)
        table = rocksdict.BlockBasedOptions()
        if config.bloom_bits_per_key > 0:
            # full (not block-based) filters; they make lookups of never-stored keys cheap
            table.set_bloom_filter(config.bloom_bits_per_key, False)
        table.set_block_cache(rocksdict.Cache(config.block_cache_mb << 20))
        # index and filter blocks stay pinned in table readers (~1.5 bytes/row at 10 bits/key)
        # rather than competing with data blocks in the block cache
        table.set_cache_index_and_filter_blocks(False)
        opts.set_block_based_table_factory(table)
        if read_only:
            access = rocksdict.AccessType.read_only()
        elif config.ttl_seconds is not None:
            access = rocksdict.AccessType.with_ttl(config.ttl_seconds)
        else:
            access = rocksdict.AccessType.read_write()
        try:
            self._db = rocksdict.Rdict(path, opts, access_type=access)
        except Exception as e:
            raise _translate(e, path, "open") from e
        self._wopt = rocksdict.WriteOptions()
        self._wopt.sync = config.sync_writes
        self._closed = False
        threads = config.read_threads or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="damo-read") if threads > 1 else None
        self._threads = threads

    @property
    def db(self) -> rocksdict.Rdict:
        if self._closed:
            raise StoreClosedError(f"store {self.path!r} is closed")
        return self._db

    def get(self, table_id: int, keys: np.ndarray) -> list[bytes | None]:
        db = self.db
        if len(keys) == 0:
            return []
        enc = encode_keys(table_id, keys)
        try:
            if self._pool is None or len(enc) < _PARALLEL_MIN:
                return db.get(enc)
            # RocksDB reads run without the GIL: split a large batch across threads
            step = -(-len(enc) // self._threads)
            parts = self._pool.map(db.get, [enc[i:i + step] for i in range(0, len(enc), step)])
            out: list[bytes | None] = []
            for p in parts:
                out += p
            return out
        except Exception as e:
            raise _translate(e, self.path, "read") from e

    def put(self, table_id: int, keys: np.ndarray, values: list[bytes]) -> None:
        db = self.db
        wb = rocksdict.WriteBatch(raw_mode=True)
        # map() keeps the per-row loop in C
        for _ in map(wb.put, encode_keys(table_id, keys), values):
            pass
        try:
            db.write(wb, self._wopt)
        except Exception as e:
            raise _translate(e, self.path, "write") from e

    def delete(self, table_id: int, keys: np.ndarray) -> None:
        db = self.db
        wb = rocksdict.WriteBatch(raw_mode=True)
        for _ in map(wb.delete, encode_keys(table_id, keys)):
            pass
        try:
            db.write(wb, self._wopt)
        except Exception as e:
            raise _translate(e, self.path, "delete from") from e

    def _bounds(self, table_id: int) -> tuple[bytes, bytes]:
        lo = int(table_id).to_bytes(4, "big") + bytes(8)
        hi = int(table_id + 1).to_bytes(4, "big") + bytes(8)
        return lo, hi

    def scan(self, table_id: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        db = self.db
        lo, _ = self._bounds(table_id)
        prefix = lo[:4]
        it = db.iter()
        it.seek(lo)
        ks: list[bytes] = []
        vs: list[bytes] = []
        while it.valid():
            k = it.key()
            if k[:4] != prefix:
                break
            ks.append(k)
            vs.append(it.value())
            if len(ks) >= batch:
                yield _decode_keys(ks), vs
                ks, vs = [], []
            it.next()
        it.status()
        if ks:
            yield _decode_keys(ks), vs

    def drop_table(self, table_id: int) -> None:
        lo, hi = self._bounds(table_id)
        try:
            self.db.delete_range(lo, hi, self._wopt)
        except Exception as e:
            raise _translate(e, self.path, "drop a table of") from e

    def flush(self) -> None:
        try:
            self.db.flush(True)
            self.db.flush_wal(True)
        except Exception as e:
            raise _translate(e, self.path, "flush") from e

    def compact(self) -> None:
        """Run a full compaction (drops TTL-expired rows and tombstones)."""
        try:
            self.db.compact_range(None, None)
        except Exception as e:
            raise _translate(e, self.path, "compact") from e

    def wait_for_compactions(self, timeout: float = 300.0) -> float:
        """Block until RocksDB has no compaction running or pending; returns seconds waited."""
        db = self.db
        t0 = time.monotonic()
        while (db.property_int_value("rocksdb.num-running-compactions")
               or db.property_int_value("rocksdb.compaction-pending")):
            if time.monotonic() - t0 > timeout:
                break
            time.sleep(0.2)
        return time.monotonic() - t0

    def running_compactions(self) -> int:
        """Compactions RocksDB is running right now."""
        return int(self.db.property_int_value("rocksdb.num-running-compactions") or 0)

    def disk_bytes(self) -> int:
        db = self.db
        total = 0
        for prop in ("rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"):
            v = db.property_int_value(prop)
            total += int(v or 0)
        return total

    def checkpoint(self, path: str) -> None:
        try:
            rocksdict.Checkpoint(self.db).create_checkpoint(path)
        except Exception as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise OutOfSpaceError(f"disk full writing checkpoint {path!r}") from e
            raise _translate(e, self.path, "checkpoint") from e

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            try:
                self._db.close()
            except Exception as e:  # e.g. RocksDB's background error after a full disk
                raise _translate(e, self.path, "close") from e
