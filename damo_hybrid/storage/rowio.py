"""Row I/O: decoded rows of one table in and out of a :class:`~damo_hybrid.storage.backend.Storage`.

:class:`RowIO` is the only code that encodes, decodes, reads, writes, deletes and scans rows.
Reads and writes run concurrently (the host manager reads while the background writer
writes: the storage is thread-safe and a write batch is atomic); its re-entrant lock guards only
the counters (each table's running row count, hits, misses, writes) and the calls that must be
atomic as a whole (a delete that counts what it removes, the uncached read-step-write). :class:`TableIO` is one
table's view of it, handed to that table's cache tiers and background writer so that they
read and write rows without reaching back into the store.

Thread safety: any thread.
"""

from __future__ import annotations

import operator
import os
import re
import threading
import time
from collections.abc import Iterator
from itertools import repeat

import numpy as np

from ..errors import CorruptRowError, DamoHybridError
from ..ops.cpu import sum_by_key
from ..rows.codec import Rows
from ..rows.table import Table
from ..timing import CLOCK
from .backend import Storage
from .keyfilter import StoredKeyFilter

__all__ = ["RowIO", "TableIO"]


class RowIO:
    """Encoded row I/O over one storage.

    Args:
        storage: the backend.
        stored: table id -> the keys it may have stored (a table without one reads every key).
        log_write_backs: the caches' write-backs go through the storage's write-ahead log too
            (``StoreConfig.write_ahead_log``); direct writes always do.
    """

    def __init__(self, storage: Storage, stored: dict[int, StoredKeyFilter] | None = None,
                 log_write_backs: bool = True) -> None:
        self.storage = storage
        self.log_write_backs = log_write_backs
        self._unlogged = self._flushed = 0  # write batches that skipped the WAL, and of them the flushed
        self.lock = threading.RLock()
        self.stored = stored if stored is not None else {}

    def read(self, t: Table, keys: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Stored rows of distinct ``keys`` (uint64 (N,)).

        Returns:
            ``(rows, found)``: rows of the M found keys, in order; bool (N,) ``found``.
        Raises:
            CorruptRowError: a stored value fails its checks.
        """
        kf = self.stored.get(t.id)
        maybe = kf.may_contain(keys) if kf is not None and len(keys) else None
        if maybe is not None and not maybe.all():  # ask the storage only for keys it may hold
            asked = keys[maybe]
            CLOCK.count("filtered", len(keys) - len(asked))
        else:
            asked, maybe = keys, None
        with CLOCK("rocksdb_read"):
            values = self.storage.get(t.id, asked)
        with CLOCK("decode"):
            try:
                rows, found = t.codec.decode(asked, values)
            except CorruptRowError as e:
                raise self._corrupt(t.name, e.key, e.reason) from e
        if maybe is not None:
            found_all = np.zeros(len(keys), dtype=bool)
            found_all[np.flatnonzero(maybe)[found]] = True
            found = found_all
        nf = int(found.sum())
        CLOCK.count("rocksdb_read", nf)
        with self.lock:
            t.counters.hits += nf
            t.counters.misses += len(keys) - nf
        return rows, found

    def write(self, t: Table, keys: np.ndarray, rows: Rows, new: np.ndarray, log: bool = True) -> None:
        """Store full rows in one atomic batch.

        Args:
            keys: uint64 (N,) distinct.
            rows: their N rows.
            new: bool (N,) rows known not to be stored yet (keeps the row count exact).
            log: through the write-ahead log (see :meth:`Storage.put`).
        """
        if not len(keys):
            return
        with CLOCK("encode"):
            values = t.codec.encode(keys, rows)
        kf = self.stored.get(t.id)
        if kf is not None:  # before the write: a key on disk is always in the filter
            kf.add(keys, t.rows + int(np.count_nonzero(new)))
        with CLOCK("rocksdb_write"):
            self.storage.put(t.id, keys, values, log)
        CLOCK.count("rocksdb_write", len(keys))
        with self.lock:
            self._unlogged += not log
            t.counters.writes += len(keys)
            t.rows += int(np.count_nonzero(new))

    def flush(self) -> None:
        """Flush the storage (every write durable, the ones that skipped the WAL included)."""
        with self.lock:
            n = self._unlogged
        self.storage.flush()
        with self.lock:
            self._flushed = max(self._flushed, n)

    @property
    def unlogged_pending(self) -> bool:
        """Whether writes that skipped the WAL may still be only in RocksDB's memtable."""
        with self.lock:
            return self._unlogged > self._flushed

    def delete(self, t: Table, keys: np.ndarray) -> int:
        """Remove distinct ``keys``; returns how many were stored."""
        with self.lock:
            present = np.fromiter(map(operator.is_not, self.storage.get(t.id, keys), repeat(None)), bool, len(keys))
            self.storage.delete(t.id, keys)
            n = int(present.sum())
            t.rows = max(0, t.rows - n)
            return n

    def scan(self, t: Table, batch: int = 65536) -> Iterator[tuple[np.ndarray, Rows]]:
        """Every stored row of a table in key order: ``(keys uint64 (M,), rows)`` chunks.

        Raises:
            CorruptRowError: a stored value fails its checks, or the storage cannot read past a
                key (a damaged file, a malformed key); it names the table and the last good key.
        """
        last = -1
        it = iter(self.storage.scan(t.id, batch))
        while True:
            try:
                item = next(it, None)
            except DamoHybridError:
                raise
            except Exception as e:  # RocksDB's own corruption errors arrive untyped
                why = self._cause(e)
                if last < 0:  # no key to blame: the table's first rows cannot be read
                    raise self._corrupt(t.name, None, f"RocksDB: {why}") from e
                raise self._corrupt(t.name, last, f"the storage cannot read past this key (the last good one): "
                                    f"{why}") from e
            if item is None:
                return
            keys, values = item
            try:
                rows, _ = t.codec.decode(keys, values)
            except CorruptRowError as e:
                raise self._corrupt(t.name, e.key, e.reason) from e
            if len(keys):
                last = int(keys[-1])
            yield keys, rows

    def _store(self) -> str | None:
        """The store's folder, for errors: RocksDB lives in its ``db/`` (None: a memory storage)."""
        path = getattr(self.storage, "path", None)
        if path is None:
            return None
        return os.path.dirname(path) if os.path.basename(path) == "db" else str(path)

    def _cause(self, e: BaseException, limit: int = 120) -> str:
        """RocksDB's message in one short line, its files named within the store (``db/000009.sst``),
        not by a reader's temporary links."""
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        path = getattr(self.storage, "path", None)
        if path is not None:
            try:
                from .rocksdb import _SHADOW  # a read-only open's folder of links to the store's files

                text = _SHADOW.sub(lambda _: str(path), text)
            except ImportError:
                pass
            text = text.replace(str(path), os.path.basename(path))
        text = re.sub(r"\s+", " ", re.sub(r"stored\(context removed\) = \d+, computed = \d+, type = \d+", "", text))
        return text if len(text) <= limit else text[:limit * 3 // 5] + " ... " + text[-(limit * 2 // 5):]

    def _corrupt(self, table: str, key: int | None, reason: str) -> CorruptRowError:
        return CorruptRowError(table, key, reason, store=self._store())

    def step(self, t: Table, keys: np.ndarray, grads: np.ndarray, lr: float) -> np.ndarray | None:
        """One optimizer step of stored rows, read and written in one atomic batch (the store's
        path for a table without a cache). Duplicates are summed and each row stepped once;
        with admission, keys not yet admitted are counted and dropped.

        Args:
            keys: uint64 (N,).
            grads: float32 (N, dim), finite.
            lr: the step's learning rate.
        Returns:
            The ``skip`` policy's keep mask over the stepped rows (None: all kept).
        Raises:
            NonFiniteUpdateError: a stepped row overflowed under the ``raise`` policy; nothing changed.
        """
        ukeys, inv, g = sum_by_key(keys, grads)
        occurrences = by_count = None
        if t.admits:
            occurrences = np.bincount(inv, minlength=len(ukeys))
            by_count = t.filter.count(ukeys) + occurrences >= t.min_count  # type: ignore[union-attr]
        keep = None
        unadmitted = 0
        with self.lock:
            now = int(time.time())
            stored, found = self.read(t, ukeys)  # one read: the rows, and which keys are stored
            rows = Rows.empty(len(ukeys), t.dim, t.width)
            rows.put(found, stored)
            wkeys = ukeys
            if by_count is not None:
                admitted = by_count | found  # a key whose row is stored is in, whatever its count says
                if not admitted.all():
                    unadmitted = int(np.count_nonzero(~admitted))
                    wkeys, g, rows, found = ukeys[admitted], g[admitted], rows.take(admitted), found[admitted]
            if len(wkeys):
                t.new_rows(rows, wkeys, ~found, now)
                t.step_rows(rows, wkeys, g, lr, now)
                keep = t.check_results(wkeys, rows.weights, rows.state)
                if keep is not None:
                    wkeys, rows, found = wkeys[keep], rows.take(keep), found[keep]
                self.write(t, wkeys, rows, ~found)
            if t.admits:
                assert occurrences is not None and t.filter is not None
                t.filter.add(ukeys, occurrences)
                t.counters.dropped_unadmitted += unadmitted
        return keep

    def bind(self, t: Table) -> TableIO:
        """One table's view."""
        return TableIO(self, t)


class TableIO:
    """Row I/O of one table (what its cache tiers and writer see of the storage)."""

    def __init__(self, io: RowIO, table: Table) -> None:
        self._io = io
        self.table = table

    def read(self, keys: np.ndarray) -> tuple[Rows, np.ndarray]:
        """See :meth:`RowIO.read`."""
        return self._io.read(self.table, keys)

    def write(self, keys: np.ndarray, rows: Rows, new: np.ndarray) -> None:
        """A cache's write-back; see :meth:`RowIO.write`."""
        self._io.write(self.table, keys, rows, new, self._io.log_write_backs)
