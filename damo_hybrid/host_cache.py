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

import time
from dataclasses import dataclass

import numpy as np

from .hashing import as_keys
from .ops.cpu import reduce_by_key
from .rows import Rows
from .slots import SlotPool
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
        self.dirty = np.zeros(capacity, dtype=bool)
        self.stored = np.zeros(capacity, dtype=bool)  # the row exists in the store
        self.slots = SlotPool(capacity, f"host cache of table {table!r}")
        self.writer = WriteBehind(store, table)
        self.stats = CacheStats()

    @property
    def pins(self) -> np.ndarray:
        """int32 (capacity,) pin count per slot."""
        return self.slots.pins

    @property
    def keys(self) -> np.ndarray:
        """uint64 (capacity,) key per slot (meaningful where occupied)."""
        return self.slots.keys

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
        slots = self.slots.lookup(ukeys)
        hit = slots >= 0
        self.stats.hits += int(hit.sum())
        miss = np.nonzero(~hit)[0]
        if len(miss):
            hits = slots[hit]
            self.slots.pin(hits)  # protect this batch's hits from the eviction below
            try:
                slots[miss] = self._load(ukeys[miss])
            finally:
                self.slots.unpin(hits)
        self.slots.touch(slots)
        if pin:
            self.slots.pin(slots)
        return slots

    def unpin(self, slots: np.ndarray) -> None:
        """Release pins taken by ``make_resident(pin=True)`` (any thread)."""
        self.slots.unpin(slots)

    def _fetch(self, keys: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Rows of keys that are not resident: the writer's queue, else the store, else new.

        Returns:
            ``(rows, stored)``: the rows, and bool (N,) whether each exists in the store.
        """
        n = len(keys)
        self.stats.misses += n
        w = np.empty((n, self.dim), dtype=np.float32)
        st = np.empty((n, self.width), dtype=np.float32)
        cnt, cr, up = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        # rows evicted a moment ago may still sit in the writer's queue: they win over disk
        queued, inq = self.writer.overlay(keys)
        found = inq.copy()
        if inq.any():
            assert queued is not None
            w[inq], st[inq], cnt[inq], cr[inq], up[inq] = (queued.weights, queued.state, queued.count,
                                                           queued.created, queued.updated)
        rest = np.nonzero(~inq)[0]
        rows, f = self.store.read_rows(self.table, keys[rest])
        self.stats.bytes_read += int(f.sum()) * self.row_bytes
        fr = rest[f]
        found[fr] = True
        w[fr], st[fr], cnt[fr], cr[fr], up[fr] = rows.weights, rows.state, rows.count, rows.created, rows.updated
        new = ~found
        if new.any():
            w[new] = self.init(keys[new])
            st[new] = self.opt.initial_state(int(new.sum()))
            cr[new] = up[new] = int(time.time())
        # a queued row is stored once its write lands (FIFO), which counts it if it is new
        return Rows(w, st, cnt, cr, up), found

    def _place(self, keys: np.ndarray, slots: np.ndarray, rows: Rows, stored: np.ndarray, dirty: bool) -> None:
        self.weights[slots], self.state[slots] = rows.weights, rows.state
        self.count[slots], self.created[slots], self.updated[slots] = rows.count, rows.created, rows.updated
        self.stored[slots] = stored
        self.dirty[slots] = dirty
        self.slots.assign(keys, slots)

    def _load(self, keys: np.ndarray) -> np.ndarray:
        slots = self.slots.take(len(keys), self._evict)
        try:
            rows, stored = self._fetch(keys)
        except BaseException:
            self.slots.free(slots)
            raise
        self._place(keys, slots, rows, stored, dirty=False)
        return slots

    def _evict(self, slots: np.ndarray) -> None:
        d = slots[self.dirty[slots]]
        if len(d):
            self._write_back(d)
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

    # ------------------------------------------- exchange with a tier above
    def take_rows(self, keys: np.ndarray) -> tuple[Rows, np.ndarray, np.ndarray]:
        """Hand rows up to a faster tier, which owns them from now on (tiers are exclusive).

        Resident rows leave this cache without a write-back; the others are fetched as
        :meth:`make_resident` would, without taking a slot.

        Args:
            keys: uint64 (N,) distinct keys.
        Returns:
            ``(rows, stored, dirty)``: the rows; bool (N,) whether each exists in the store;
            bool (N,) whether it holds updates the store lacks.
        """
        slots = self.slots.lookup(keys)
        hit = slots >= 0
        n = len(keys)
        w = np.empty((n, self.dim), dtype=np.float32)
        st = np.empty((n, self.width), dtype=np.float32)
        cnt, cr, up = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        stored, dirty = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        if hit.any():
            hs = slots[hit]
            if (self.slots.pins[hs] > 0).any():
                raise RuntimeError(f"take_rows: pinned rows of table {self.table!r} cannot move to another tier")
            self.stats.hits += len(hs)
            w[hit], st[hit], cnt[hit], cr[hit], up[hit] = (self.weights[hs], self.state[hs], self.count[hs],
                                                           self.created[hs], self.updated[hs])
            stored[hit], dirty[hit] = self.stored[hs], self.dirty[hs]
            self.dirty[hs] = False
            self.slots.release(hs)
        miss = ~hit
        if miss.any():
            rows, s = self._fetch(keys[miss])
            w[miss], st[miss], cnt[miss], cr[miss], up[miss] = (rows.weights, rows.state, rows.count,
                                                                rows.created, rows.updated)
            stored[miss] = s
        return Rows(w, st, cnt, cr, up), stored, dirty

    def put_rows(self, keys: np.ndarray, rows: Rows, stored: np.ndarray) -> None:
        """Take back modified rows from a faster tier (its evictions and flushes); they are dirty here.

        Args:
            keys: uint64 (N,) distinct keys.
            rows: their rows.
            stored: bool (N,) whether each exists in the store, as the other tier knows it
                (a resident row keeps this cache's own flag).
        """
        slots = self.slots.lookup(keys)
        hit = slots >= 0
        miss = np.nonzero(~hit)[0]
        if len(miss):
            hits = slots[hit]
            self.slots.pin(hits)
            try:
                slots[miss] = self.slots.take(len(miss), self._evict)
            finally:
                self.slots.unpin(hits)
            self.stored[slots[miss]] = stored[miss]
            self.slots.assign(keys[miss], slots[miss])
        self.weights[slots], self.state[slots] = rows.weights, rows.state
        self.count[slots], self.created[slots], self.updated[slots] = rows.count, rows.created, rows.updated
        self.dirty[slots] = True
        self.slots.touch(slots)

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
        return len(self.slots)

