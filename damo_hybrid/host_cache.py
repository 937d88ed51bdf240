"""LRU host cache of one table's rows, in front of an :class:`EmbeddingStore`.

Rows (weights, optimizer state, update count, creation time) live in a fixed slab of
``capacity`` slots. A vectorized :class:`~damo_hybrid.keyindex.KeyIndex` maps keys to slots;
replacement is CLOCK (a one-bit approximation of LRU) swept in vectorized chunks. A row
modified in the cache is dirty and goes back to RocksDB when it is evicted or on
:meth:`HostCache.flush`. Rows can be pinned (the rows of batches in flight) and are then
never evicted.

A row's value never depends on which tier served it: a key missing from the cache is read
from the store, or initialised exactly as the store would, and updated with the store's own
optimizer and global-step schedule.

Thread safety: the host manager thread owns residency (:meth:`make_resident`, eviction,
write-back, the key index); the worker thread may at the same time read and step the rows of
slots it holds pinned (:meth:`step_slots`) and :meth:`unpin` them. Pins are the only state
both touch, and a lock guards them; pinned rows are never evicted, so the two threads never
touch the same row otherwise. Everything else needs one caller at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from .hashing import as_keys
from .keyindex import KeyIndex
from .ops.cpu import reduce_by_key
from .rows import Rows
from .store import EmbeddingStore
from .writer import WriteBehind

__all__ = ["HostCache", "CacheStats"]

_WRITE_CHUNK = 1 << 16  # rows per write-back batch handed to the writer


@dataclass
class CacheStats:
    """Counters of one cache (unique keys per call, not occurrences).

    Attributes:
        hits: keys found resident.
        misses: keys made resident (read from the store or initialised).
        evictions: rows evicted.
        write_backs: dirty rows written to the store.
        bytes_read: row bytes read from the store.
        bytes_written: row bytes written to the store.
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    write_backs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class HostCache:
    """One table's rows in host memory.

    Args:
        store: the backing store (it keeps the table's config and global step).
        table: table name.
        capacity: slots (rows held at most). Pinned rows plus one batch's distinct keys
            must fit.

    Raises:
        ValueError: capacity < 1, or a table with admission (not cached yet).

    Example:
        >>> cache = HostCache(store, "user", capacity=1_000_000)   # doctest: +SKIP
        >>> w = cache.lookup(keys)                                  # doctest: +SKIP
        >>> cache.apply_gradients(keys, grads)                      # doctest: +SKIP
        >>> cache.flush()                                           # doctest: +SKIP
    """

    def __init__(self, store: EmbeddingStore, table: str, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        cfg = store.tables.get(table)
        if cfg is None:
            store.table_ops(table)  # raises UnknownTableError with the usual message
            raise AssertionError("unreachable")
        if cfg.admission is not None:
            raise ValueError(f"table {table!r} uses admission, which the host cache does not support yet; "
                             "use the store directly for it")
        self.store, self.table = store, table
        self.init, self.opt = store.table_ops(table)
        self.dim, self.width = self.opt.dim, self.opt.width
        self.capacity = capacity
        self.row_bytes = 4 * (self.dim + self.width) + 16
        self.weights = np.zeros((capacity, self.dim), dtype=np.float32)
        self.state = np.zeros((capacity, self.width), dtype=np.float32)
        self.count = np.zeros(capacity, dtype=np.int64)
        self.created = np.zeros(capacity, dtype=np.int64)
        self.updated = np.zeros(capacity, dtype=np.int64)
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.occupied = np.zeros(capacity, dtype=bool)
        self.dirty = np.zeros(capacity, dtype=bool)
        self.stored = np.zeros(capacity, dtype=bool)  # the row exists in the store
        self.ref = np.zeros(capacity, dtype=bool)
        self.pins = np.zeros(capacity, dtype=np.int32)
        self.index = KeyIndex(capacity)
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # a stack: pop from the end
        self._nfree = capacity
        self._hand = 0
        self._pin_lock = threading.Lock()
        self.writer = WriteBehind(store, table)
        self.stats = CacheStats()

    @classmethod
    def nbytes_per_row(cls, dim: int, state_width: int) -> int:
        """Host bytes one slot costs (slab + metadata + index), for sizing from a budget."""
        return 4 * (dim + state_width) + 8 * 4 + 4 + 4 + 2 * 8 * 2

    # ------------------------------------------------------------ residency
    def make_resident(self, ukeys: np.ndarray, pin: bool = False) -> np.ndarray:
        """Slots holding ``ukeys``, loading or initialising the missing ones.

        Args:
            ukeys: uint64 (N,) distinct keys.
            pin: keep the returned slots pinned (release with :meth:`unpin`).
        Returns:
            int64 (N,) slots.
        Raises:
            RuntimeError: not enough unpinned slots for the missing keys.
        """
        slots = self.index.lookup(ukeys)
        hit = slots >= 0
        self.stats.hits += int(hit.sum())
        miss = np.nonzero(~hit)[0]
        if len(miss):
            hits = slots[hit]
            with self._pin_lock:
                self.pins[hits] += 1  # protect this batch's hits from the eviction below
            try:
                slots[miss] = self._load(ukeys[miss])
            finally:
                with self._pin_lock:
                    self.pins[hits] -= 1
        self.ref[slots] = True
        if pin:
            with self._pin_lock:
                self.pins[slots] += 1
        return slots

    def unpin(self, slots: np.ndarray) -> None:
        """Release pins taken by ``make_resident(pin=True)`` (any thread)."""
        with self._pin_lock:
            self.pins[slots] -= 1

    def _load(self, keys: np.ndarray) -> np.ndarray:
        n = len(keys)
        self.stats.misses += n
        slots = self._take_slots(n)
        # rows evicted a moment ago may still sit in the writer's queue: they win over disk
        queued, inq = self.writer.overlay(keys)
        found = inq.copy()
        stored = np.zeros(n, dtype=bool)
        if inq.any():
            rows = queued
            assert rows is not None
            qs = slots[inq]
            self.weights[qs], self.state[qs] = rows.weights, rows.state
            self.count[qs], self.created[qs], self.updated[qs] = rows.count, rows.created, rows.updated
            stored[inq] = True  # its queued write lands first (FIFO) and counts it if new
        rest = np.nonzero(~inq)[0]
        rows, f = self.store.read_rows(self.table, keys[rest])
        self.stats.bytes_read += int(f.sum()) * self.row_bytes
        found[rest[f]] = True
        stored[rest[f]] = True
        fs = slots[rest[f]]
        self.weights[fs], self.state[fs] = rows.weights, rows.state
        self.count[fs], self.created[fs], self.updated[fs] = rows.count, rows.created, rows.updated
        ns = slots[~found]
        if len(ns):
            self.weights[ns] = self.init(keys[~found])
            self.state[ns] = self.opt.initial_state(len(ns))
            self.count[ns] = 0
            self.created[ns] = self.updated[ns] = int(time.time())
        self.keys[slots] = keys
        self.occupied[slots] = True
        self.stored[slots] = stored
        self.dirty[slots] = False
        self.index.insert(keys, slots)
        return slots

    def _take_slots(self, n: int) -> np.ndarray:
        take = min(n, self._nfree)
        out = self._free[self._nfree - take:self._nfree][::-1].copy()
        self._nfree -= take
        if take < n:
            victims = self._victims(n - take)
            self._evict(victims)
            out = np.concatenate([out, victims])
        return out

    def _victims(self, need: int) -> np.ndarray:
        """CLOCK: sweep from the hand, clearing reference bits, taking unreferenced unpinned rows."""
        cap = self.capacity
        found: list[np.ndarray] = []
        got = 0
        swept = 0
        while got < need:
            if swept > 2 * cap:
                if found:
                    with self._pin_lock:
                        self.pins[np.concatenate(found)] -= 1
                raise RuntimeError(
                    f"host cache of table {self.table!r} cannot free {need} slots: its {cap} slots are "
                    "pinned or needed by this batch; raise the cache budget or lower the batch size"
                )
            k = min(cap, max(4 * (need - got), 4096))
            chunk = (self._hand + np.arange(k)) % cap
            cand = ~self.ref[chunk] & (self.pins[chunk] == 0) & self.occupied[chunk]
            csum = np.cumsum(cand)
            if csum[-1] >= need - got:
                cut = int(np.searchsorted(csum, need - got)) + 1
            else:
                cut = k
            passed = chunk[:cut]
            v = passed[cand[:cut]]
            with self._pin_lock:
                self.pins[v] += 1  # chosen: not a candidate again on a later lap
            found.append(v)
            got += len(v)
            self.ref[passed] = False
            self._hand = int((self._hand + cut) % cap)
            swept += cut
        victims = np.concatenate(found)
        with self._pin_lock:
            self.pins[victims] -= 1
        return victims

    def _evict(self, slots: np.ndarray) -> None:
        d = slots[self.dirty[slots]]
        if len(d):
            self._write_back(d)
        self.index.delete(self.keys[slots])
        self.occupied[slots] = False
        self.dirty[slots] = False
        self.stats.evictions += len(slots)

    def _write_back(self, slots: np.ndarray) -> None:
        """Hand dirty rows to the background writer (copies; the slots can be reused).

        In chunks, so a flush of a large cache holds at most the writer's queue depth of
        chunks in flight instead of a copy of every dirty row at once."""
        for i in range(0, len(slots), _WRITE_CHUNK):
            c = slots[i:i + _WRITE_CHUNK]
            rows = Rows(self.weights[c], self.state[c], self.count[c], self.created[c], self.updated[c])
            self.writer.submit(self.keys[c], rows, new=~self.stored[c])
        self.stored[slots] = True
        self.dirty[slots] = False
        self.stats.write_backs += len(slots)
        self.stats.bytes_written += len(slots) * self.row_bytes

    # ------------------------------------------------------------- batch API
    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Weights of ``keys``, as :meth:`EmbeddingStore.lookup` gives them.

        Args:
            keys: uint64 (N,).
        Returns:
            float32 (N, dim).
        """
        ukeys, inv = np.unique(as_keys(keys), return_inverse=True)
        slots = self.make_resident(ukeys)
        return self.weights[slots[inv]]

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, step: int | None = None) -> None:
        """One optimizer step, with the store's semantics (duplicates summed, one step per key)."""
        keys, grads, lr = self.store.begin_step(self.table, keys, grads, step)
        if len(keys):
            ukeys, inv = np.unique(keys, return_inverse=True)
            g = reduce_by_key(grads, inv, len(ukeys))
            slots = self.make_resident(ukeys)
            self.step_slots(slots, g, lr)
        self.store.end_step(self.table)

    def step_slots(self, slots: np.ndarray, g: np.ndarray, lr: float) -> None:
        """Apply summed gradients to resident rows.

        Args:
            slots: int64 (U,) distinct resident slots.
            g: float32 (U, dim) summed gradients.
            lr: scheduled learning rate.
        """
        w, st = self.weights[slots], self.state[slots]
        cnt = self.count[slots] + 1
        self.opt.update(w, st, g, cnt, lr)
        self.weights[slots], self.state[slots], self.count[slots] = w, st, cnt
        self.updated[slots] = int(time.time())
        self.dirty[slots] = True

    def flush(self) -> None:
        """Write every dirty row back, wait for the writer, and flush the store."""
        d = np.nonzero(self.dirty)[0]
        if len(d):
            self._write_back(d)
        self.writer.drain()
        self.store.flush()

    def __len__(self) -> int:
        return len(self.index)

