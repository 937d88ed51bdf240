"""Rows in RocksDB through rocksdict: the :class:`~damo_hybrid.storage.backend.Storage` used for real.

Keys are the 12-byte encoding of :func:`~damo_hybrid.storage.backend.encode_keys`, so a
table's rows are contiguous and sorted by key. RocksDB errors are translated into the
package's typed errors (locked, out of space, closed).

Not thread-safe by itself beyond what RocksDB gives; the store serialises calls.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import rocksdict

from ..config import StoreConfig
from ..errors import (
    DamoHybridError,
    OutOfSpaceError,
    StoreClosedError,
    StoreLockedError,
)
from .backend import decode_keys, encode_keys

__all__ = ["RocksDBStorage"]

_PARALLEL_MIN = 8192  # below this a multi-get is not worth splitting


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
            # the column family's options must be named: rocksdict gives the column families of
            # an existing database its own defaults otherwise (no bloom filter, an 8 MiB block
            # cache, compressed blocks), so every reopened store read ~10x slower per missing key
            self._db = rocksdict.Rdict(path, opts, column_families={"default": opts}, access_type=access)
        except Exception as e:
            raise _translate(e, path, "open") from e
        self._wopt = rocksdict.WriteOptions()
        self._wopt.sync = config.sync_writes
        # write-backs the caches hold anyway until a flush: RocksDB's memtable, not its log too
        self._wopt_unlogged = self._wopt
        if not (config.write_ahead_log or config.sync_writes):
            self._wopt_unlogged = rocksdict.WriteOptions()
            self._wopt_unlogged.disable_wal = True
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

    def put(self, table_id: int, keys: np.ndarray, values: list[bytes], log: bool = True) -> None:
        db = self.db
        wb = rocksdict.WriteBatch(raw_mode=True)
        # map() keeps the per-row loop in C
        for _ in map(wb.put, encode_keys(table_id, keys), values):
            pass
        try:
            db.write(wb, self._wopt if log else self._wopt_unlogged)
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
                yield decode_keys(ks), vs
                ks, vs = [], []
            it.next()
        it.status()
        if ks:
            yield decode_keys(ks), vs

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
