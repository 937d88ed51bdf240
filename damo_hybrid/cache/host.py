"""Host tier: one table's rows in a slab of host memory, in front of the storage.

Rows (weights, optimizer state, update count, creation time) live in a fixed slab of
``capacity`` slots. A vectorized :class:`~damo_hybrid.cache.keyindex.KeyIndex` maps keys to
slots; replacement is a generalised CLOCK (use counts, :class:`~damo_hybrid.cache.slots.SlotPool`) swept in vectorized chunks. A row
modified in the cache is dirty and goes to the table's background writer when it is evicted
or flushed. Rows can be pinned (the rows of batches in flight) and are then never evicted.

A row's value never depends on which tier served it: a key missing from the cache is read
from the writer's queue or the storage, or initialised exactly as the store would.

Thread safety: the host manager thread owns residency (:meth:`HostCache.make_resident`,
eviction, write-back, the key index), under the table's tier lock
(:class:`~damo_hybrid.cache.tiers.TableTiers`); the worker thread may at the same time step
the rows of slots it holds pinned (:meth:`HostCache.commit_slots`) and unpin them. Pins are the
only state both touch, and a lock guards them; pinned rows are never evicted, so the two
threads never touch the same row otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..rows.codec import Rows
from ..rows.kernels import OK, RowStep, gather_rows, scatter_step
from ..storage.rowio import TableIO
from ..timing import CLOCK
from .slots import SlotPool
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
        io: the table's row I/O (the tier below).
        capacity: slots (rows held at most). Pinned rows plus one batch's distinct keys
            must fit.

    Raises:
        ValueError: capacity < 1.
    """

    def __init__(self, io: TableIO, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        t = io.table
        self.io, self.table, self.name = io, t, t.name
        self.init, self.opt = t.init, t.opt
        self.dim, self.width = t.dim, t.width
        self.capacity = capacity
        self.prec = prec = t.prec
        self.row_bytes = prec.itemsize * self.dim + 4 * self.width + 16
        self.weights = np.zeros((capacity, self.dim), dtype=prec.slab_dtype)  # 16-bit tables: packed
        self.state = np.zeros((capacity, self.width), dtype=np.float32)
        self.count = np.zeros(capacity, dtype=np.int64)
        self.created = np.zeros(capacity, dtype=np.int64)
        self.updated = np.zeros(capacity, dtype=np.int64)
        self.dirty = np.zeros(capacity, dtype=bool)
        self.stored = np.zeros(capacity, dtype=bool)  # the row exists in the storage
        self.slots = SlotPool(capacity, f"host cache of table {t.name!r}")
        self.writer = WriteBehind(io)
        self.stats = CacheStats()
        # float32 rows step in one compiled pass without the GIL (16-bit rows round in numpy)
        self._fused = RowStep(t.opt) if prec.exact else None

    @property
    def pins(self) -> np.ndarray:
        """int32 (capacity,) pin count per slot."""
        return self.slots.pins

    @property
    def keys(self) -> np.ndarray:
        """uint64 (capacity,) key per slot (meaningful where occupied)."""
        return self.slots.keys

    @classmethod
    def nbytes_per_row(cls, dim: int, state_width: int, weight_bytes: int = 4) -> int:
        """Host bytes one slot costs (slab, metadata, the pool's key index and policy), for
        sizing from a budget."""
        return int(math.ceil(weight_bytes * dim + 4 * state_width + 3 * 8 + 2 + SlotPool.nbytes_per_row()))

    def _rows(self, slots: np.ndarray) -> Rows:
        """Copies of the rows in ``slots`` (float32 weights)."""
        return Rows(self.prec.unpack(self.weights[slots]), self.state[slots], self.count[slots],
                    self.created[slots], self.updated[slots])

    def _put(self, slots: np.ndarray, rows: Rows) -> None:
        """``slab[slots] = rows`` (weights on the table's grid)."""
        self.weights[slots], self.state[slots] = self.prec.pack(rows.weights), rows.state
        self.count[slots], self.created[slots], self.updated[slots] = rows.count, rows.created, rows.updated

    def weights_of(self, slots: np.ndarray) -> np.ndarray:
        """float32 (N, dim): the weights in ``slots`` (copies)."""
        if self.prec.exact:
            return gather_rows(self.weights, slots)
        return self.prec.unpack(self.weights[slots])

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
        CLOCK.count("hits", int(hit.sum()))
        CLOCK.count("unique", len(ukeys))
        miss = np.nonzero(~hit)[0]
        if len(miss):
            hits = slots[hit]
            self.slots.pin(hits)  # protect this batch's hits from the eviction below
            try:
                slots[miss] = self._load(ukeys[miss])
            finally:
                self.slots.unpin(hits)
        self.slots.touch(slots[hit])  # rows loaded just now enter unused (see SlotPool)
        if pin:
            self.slots.pin(slots)
        return slots

    def unpin(self, slots: np.ndarray) -> None:
        """Release pins taken by ``make_resident(pin=True)`` (any thread)."""
        self.slots.unpin(slots)

    def read_below(self, keys: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Rows of keys that are not resident, from the writer's queue, else the storage.

        Args:
            keys: uint64 (N,) distinct.
        Returns:
            ``(rows, found)``: N rows (unfound ones uninitialised), bool (N,) whether each
            exists below this tier.
        """
        out = Rows.empty(len(keys), self.dim, self.width)
        # rows evicted a moment ago may still sit in the writer's queue: they win over disk
        with CLOCK("overlay"):
            queued, found = self.writer.overlay(keys)
        if queued is not None:
            out.put(found, queued)
        rest = np.nonzero(~found)[0]
        rows, f = self.io.read(keys[rest])
        self.stats.bytes_read += int(f.sum()) * self.row_bytes
        out.put(rest[f], rows)
        found[rest[f]] = True
        return out, found

    def _fetch(self, keys: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Rows of keys that are not resident: from below, or initialised.

        Returns:
            ``(rows, stored)``: the rows, and bool (N,) whether each exists in the storage.
        """
        self.stats.misses += len(keys)
        rows, found = self.read_below(keys)
        with CLOCK("init"):
            self.table.new_rows(rows, keys, ~found, int(time.time()))
        CLOCK.count("init", len(keys) - int(np.count_nonzero(found)))
        # a queued row is stored once its write lands (FIFO), which counts it if it is new
        return rows, found

    def peek(self, keys: np.ndarray) -> tuple[Rows, np.ndarray, np.ndarray]:
        """Resident rows of ``keys``, without changing residency or stats.

        Returns:
            ``(rows, hit, known)``: rows of the M resident keys in order; bool (N,) resident;
            bool (M,) whether each resident row exists in the storage or holds updates.
        """
        slots = self.slots.lookup(keys)
        hit = slots >= 0
        s = slots[hit]
        return self._rows(s), hit, self.stored[s] | self.dirty[s]

    def _place(self, keys: np.ndarray, slots: np.ndarray, rows: Rows, stored: np.ndarray, dirty: bool) -> None:
        self._put(slots, rows)
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
            self.writer.submit(self.keys[c], self._rows(c), new=~self.stored[c])
            # per chunk: a later chunk's failure must not leave this one dirty and "new" (written twice)
            self.stored[c] = True
            self.dirty[c] = False
            self.stats.write_backs += len(c)
            self.stats.bytes_written += len(c) * self.row_bytes

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
        rows = Rows.empty(n, self.dim, self.width)
        stored, dirty = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        if hit.any():
            hs = slots[hit]
            if (self.slots.pins[hs] > 0).any():
                raise RuntimeError(f"take_rows: pinned rows of table {self.name!r} cannot move to another tier")
            self.stats.hits += len(hs)
            rows.put(hit, self._rows(hs))
            stored[hit], dirty[hit] = self.stored[hs], self.dirty[hs]
            self.dirty[hs] = False
            self.slots.release(hs)
        miss = ~hit
        if miss.any():
            got, s = self._fetch(keys[miss])
            rows.put(miss, got)
            stored[miss] = s
        return rows, stored, dirty

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
        self._put(slots, rows)
        self.dirty[slots] = True
        self.slots.touch(slots)

    # ------------------------------------------------------------ worker
    def stage_slots(self, slots: np.ndarray, g: np.ndarray, lr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One optimizer step of resident rows, on copies: nothing changes until :meth:`commit_slots`
        (so the caller can check the results first).

        Args:
            slots: int64 (U,) distinct resident slots.
            g: float32 (U, dim) summed gradients.
            lr: scheduled learning rate.
        Returns:
            ``(weights (U, dim), state (U, width), count (U,))`` after the step.
        """
        w, st = self.weights_of(slots), self.state[slots]
        cnt = self.count[slots] + 1
        self.opt.update(w, st, g, cnt, lr)
        if not self.prec.exact:  # 16-bit rows: back onto the grid (float32 tables skip the key gather)
            w = self.prec.stochastic(w, self.keys[slots], cnt)
        return w, st, cnt

    def stage_checked(self, slots: np.ndarray, g: np.ndarray,
                      lr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """:meth:`stage_slots` of float32 rows in one compiled pass (no GIL), when every gradient
        and every result is finite; None otherwise (16-bit rows, or a NaN/Inf: the caller then
        takes :meth:`stage_slots` and the table's NaN/Inf policy).

        Args:
            slots: int64 (U,) distinct resident slots.
            g: float32 (U, dim) C-contiguous summed gradients.
            lr: scheduled learning rate.
        """
        if self._fused is None:
            return None
        w, st, cnt, status = self._fused.stage(self.weights, self.state, self.count, slots, g, lr)
        return (w, st, cnt) if status == OK else None

    def commit_slots(self, slots: np.ndarray, w: np.ndarray, st: np.ndarray, cnt: np.ndarray,
                     keep: np.ndarray | None = None) -> None:
        """Store a staged step of resident rows (see :meth:`stage_slots`); ``keep``: optional
        bool (U,) rows to store (the others keep their value)."""
        if keep is None and self.prec.exact:
            scatter_step(self.weights, self.state, self.count, self.updated, self.dirty,
                         np.ascontiguousarray(slots, dtype=np.int64), w, st, cnt, int(time.time()))
            return
        if keep is not None:
            slots, w, st, cnt = slots[keep], w[keep], st[keep], cnt[keep]
        self.weights[slots], self.state[slots], self.count[slots] = self.prec.pack(w), st, cnt
        self.updated[slots] = int(time.time())
        self.dirty[slots] = True

    def stage_through(self, keys: np.ndarray, g: np.ndarray, lr: float) -> tuple[Rows, np.ndarray]:
        """One optimizer step of rows that are not resident, without making them resident: read
        from below (or initialise) and step copies; :meth:`commit_through` hands them to the writer.
        No slot is taken, so any number of keys fits.

        Args:
            keys: uint64 (U,) distinct keys not resident in this tier.
            g: float32 (U, dim) summed gradients.
            lr: the step's learning rate.
        Returns:
            ``(rows, stored)``: the stepped rows, and bool (U,) whether each exists in the storage.
        """
        rows, stored = self._fetch(keys)
        self.table.step_rows(rows, keys, g, lr, int(time.time()))
        return rows, stored

    def commit_through(self, keys: np.ndarray, rows: Rows, stored: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Hand a staged step of non-resident rows to the writer, which orders them after any
        older copy it still holds (see :meth:`stage_through`); ``keep`` as in :meth:`commit_slots`."""
        if keep is not None:
            keys, rows, stored = keys[keep], rows.take(keep), stored[keep]
        for i in range(0, len(keys), _WRITE_CHUNK):
            c = slice(i, i + _WRITE_CHUNK)
            self.writer.submit(keys[c], rows.take(c), new=~stored[c])
        self.stats.write_backs += len(keys)
        self.stats.bytes_written += len(keys) * self.row_bytes

    def write_back_dirty(self) -> None:
        """Hand every dirty row to the writer (they stay resident, clean); see :meth:`WriteBehind.drain`."""
        d = np.nonzero(self.dirty)[0]
        if len(d):
            self._write_back(d)

    def discard(self, keys: np.ndarray) -> None:
        """Forget the resident copies of ``keys`` without writing them (their rows were
        written or deleted below).

        Raises:
            RuntimeError: a row is pinned by a batch in flight.
        """
        slots = self.slots.lookup(keys)
        s = slots[slots >= 0]
        if (self.slots.pins[s] > 0).any():
            raise RuntimeError(f"rows of table {self.name!r} are pinned by a batch in flight; "
                               "apply or release the batch first")
        self.dirty[s] = False
        self.slots.release(s)

    def __len__(self) -> int:
        return len(self.slots)

