"""Rows in RocksDB through rocksdict: the :class:`~damo_hybrid.storage.backend.Storage` used for real.

Keys are the 12-byte encoding of :func:`~damo_hybrid.storage.backend.encode_keys`, so a
table's rows are contiguous and sorted by key. RocksDB errors are translated into the
package's typed errors (locked, out of space, closed).

Not thread-safe by itself beyond what RocksDB gives; the store serialises calls.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
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

log = logging.getLogger(__name__)

_PARALLEL_MIN = 8192  # below this a multi-get is not worth splitting
_ROCKSDICT_CONFIG = "rocksdict-config.json"  # rocksdict's own file in the database folder
_SHADOW_PREFIX = "damo-read-"  # a reader's folder of links (see RocksDBStorage._open_read_only)
_SHADOW = re.compile(rf"[^\s'\"]*{_SHADOW_PREFIX}[A-Za-z0-9_]+")


_MAX_MESSAGE = 299  # characters of a translated error: one line under 300 (issue 28, class 8)


def _cut(text: str, room: int) -> str:
    """``text`` cut in its middle to ``room`` characters: RocksDB says what failed first and
    names the file and the system's cause ("Read-only file system") last."""
    if len(text) <= room:
        return text
    head = (room - 1) // 2
    return text[:head] + "…" + text[len(text) - (room - 1 - head):]


def _fit(template: str, path: str, msg: str) -> str:
    """``template`` (with ``{path}`` and ``{msg}``) filled in one line of at most
    :data:`_MAX_MESSAGE` characters: the database's files named within the store
    (``db/MANIFEST-000005``; its path is said once), then a long path, then a long message, cut
    in the middle."""
    msg = " ".join(msg.split()).replace(os.path.dirname(path.rstrip(os.sep)) + os.sep, "")
    room = _MAX_MESSAGE - len(template.format(path="", msg=""))
    if len(path) + len(msg) > room:
        path = _cut(path, max(room - len(msg), 60))
        msg = _cut(msg, room - len(path))
    return template.format(path=path, msg=msg)


def _translate(e: Exception, path: str, action: str) -> DamoHybridError:
    msg = _SHADOW.sub(lambda m: path, str(e))  # a reader's files by the store's name, not its links
    low = msg.lower()
    if "lock" in low and ("resource temporarily unavailable" in low or "no locks available" in low or "lock hold" in low):
        return StoreLockedError(_fit(
            "store '{path}' is locked: another process or open handle is using it ({msg}). "
            "Close the other handle, or open a checkpoint copy instead.", path, msg))
    if "no space left" in low or "enospc" in low:
        return OutOfSpaceError(_fit(
            f"disk full while trying to {action} store '{{path}}' ({{msg}}); the write was not applied. "
            "Free disk space and retry; data written before is intact.", path, msg))
    if isinstance(e, rocksdict.DbClosedError):
        return StoreClosedError(_fit("store '{path}' is closed", path, ""))
    return DamoHybridError(_fit(f"RocksDB failed to {action} store '{{path}}': {{msg}}", path, msg))


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
        self._shadow: str | None = None
        if read_only:
            access = rocksdict.AccessType.read_only()
        elif config.ttl_seconds is not None:
            access = rocksdict.AccessType.with_ttl(config.ttl_seconds)
        else:
            access = rocksdict.AccessType.read_write()
        # the column family's options must be named: rocksdict gives the column families of
        # an existing database its own defaults otherwise (no bloom filter, an 8 MiB block
        # cache, compressed blocks), so every reopened store read ~10x slower per missing key
        if read_only:
            self._db = self._open_read_only(path, opts, access)
        else:
            try:
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

    def _open_read_only(self, path: str, opts: rocksdict.Options, access: rocksdict.AccessType) -> rocksdict.Rdict:
        """The database at ``path`` opened read-only through a private folder of links to its files.

        rocksdict creates the folder it opens and rewrites its ``rocksdict-config.json`` there on
        every open, read-only ones included: a reader would modify the store and fail on read-only
        media. It opens a temporary folder of symbolic links instead (RocksDB's read-only mode
        writes nothing, not even its LOG), removed at :meth:`close`. A writer that changes the
        folder meanwhile (a new MANIFEST, a compaction) is met by linking again."""
        if not os.path.isfile(os.path.join(path, "CURRENT")):
            raise DamoHybridError(f"no RocksDB database at {path!r} (its CURRENT file is missing): "
                                  "not a store, or a damaged one; restore it from a checkpoint")
        for attempt in range(5):
            names = sorted(os.listdir(path))
            try:
                shadow = tempfile.mkdtemp(prefix=_SHADOW_PREFIX)
            except OSError:  # no writable temporary folder: open in place, as rocksdict does
                log.warning("no temporary folder to read %s through: rocksdict rewrites its config file there", path)
                try:
                    return rocksdict.Rdict(path, opts, column_families={"default": opts}, access_type=access)
                except Exception as e:
                    raise _translate(e, path, "open") from e
            try:
                for n in names:
                    if n == _ROCKSDICT_CONFIG:  # rocksdict rewrites it: a copy, never the store's own
                        shutil.copyfile(os.path.join(path, n), os.path.join(shadow, n))
                    elif n != "LOCK" and not n.startswith("LOG"):
                        os.symlink(os.path.abspath(os.path.join(path, n)), os.path.join(shadow, n))
                db = rocksdict.Rdict(shadow, opts, column_families={"default": opts}, access_type=access)
            except Exception as e:
                shutil.rmtree(shadow, ignore_errors=True)
                if attempt < 4 and sorted(os.listdir(path)) != names:
                    continue  # a writer replaced files while we linked: link the new set
                if isinstance(e, OSError):
                    raise
                raise _translate(e, path, "open") from e
            self._shadow = shadow
            weakref.finalize(self, shutil.rmtree, shadow, True)
            return db
        raise AssertionError("unreachable")

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
            finally:
                if self._shadow is not None:
                    shutil.rmtree(self._shadow, ignore_errors=True)
