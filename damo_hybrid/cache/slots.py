"""Slot bookkeeping shared by the cache tiers (host memory, device memory).

A tier holds rows in a fixed slab of ``capacity`` slots. :class:`SlotPool` keeps which key
sits in which slot (a vectorized :class:`~damo_hybrid.cache.keyindex.KeyIndex`), the free slots,
pin counts (rows of batches in flight, never evicted) and replacement by a generalised CLOCK
swept from a hand in vectorized chunks. Each slot has a use count: a batch that finds its row
resident adds one (up to :data:`MAX_USES`), the hand takes one off each slot it passes, and it
evicts slots at zero. A row enters at zero, so a key seen once (the long tail of a Zipf stream)
leaves after one lap of the hand, while a row used in several batches stays for as many laps:
on the synthetic Criteo stream at a host cache of 25% (5%) of the table this raised the hit
rate from 0.495 to 0.535 (0.30 to 0.34) against a one-bit CLOCK that entered rows referenced.
The tier owns the row data; the pool only says which slots to reuse and calls the tier back to
evict them.

Thread safety: pins are guarded by a lock (the worker thread unpins while the host-manager
thread evicts); everything else needs one caller at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ..timing import CLOCK
from .keyindex import KeyIndex

__all__ = ["SlotPool", "MAX_USES"]

MAX_USES = 3  # laps of the hand a row earns at most (more measured no better)


class SlotPool:
    """Key -> slot mapping with a free list, pins and CLOCK eviction.

    Args:
        capacity: slots.
        what: names the tier in error messages (``"host cache of table 'emb'"``).
    """

    def __init__(self, capacity: int, what: str) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity, self.what = capacity, what
        self.index = KeyIndex(capacity)
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.occupied = np.zeros(capacity, dtype=bool)
        self.ref = np.zeros(capacity, dtype=np.uint8)  # use counts
        self.pins = np.zeros(capacity, dtype=np.int32)
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # a stack: pop from the end
        self._nfree = capacity
        self._hand = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """uint64 (N,) -> int64 (N,) slots, -1 where absent."""
        with CLOCK("index"):
            return self.index.lookup(keys)

    def touch(self, slots: np.ndarray) -> None:
        """Count a use of distinct resident slots (a batch found their rows resident)."""
        self.ref[slots] = np.minimum(self.ref[slots], MAX_USES - 1) + 1

    def pin(self, slots: np.ndarray) -> None:
        with self.lock:
            self.pins[slots] += 1

    def unpin(self, slots: np.ndarray) -> None:
        with self.lock:
            self.pins[slots] -= 1

    def take(self, n: int, evict: Callable[[np.ndarray], None]) -> np.ndarray:
        """``n`` slots to fill: free ones first, then CLOCK victims.

        ``evict(victims)`` is called while the victims still hold their keys (to write dirty
        rows back); they are then unmapped. The caller maps the returned slots with
        :meth:`assign`.

        Raises:
            RuntimeError: fewer than ``n`` slots are unpinned.
        """
        take = min(n, self._nfree)
        out = self._free[self._nfree - take:self._nfree][::-1].copy()
        self._nfree -= take
        if take < n:
            try:
                with CLOCK("victims"):
                    victims = self._victims(n - take)
                with CLOCK("evict"):
                    evict(victims)
            except BaseException:
                self._nfree += take  # the free slots popped above are still free
                raise
            CLOCK.count("evict", len(victims))
            with CLOCK("index"):
                self.index.delete(self.keys[victims])
            self.occupied[victims] = False
            out = np.concatenate([out, victims])
        return out

    def assign(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Map distinct ``keys`` to the slots :meth:`take` gave."""
        self.keys[slots] = keys
        self.occupied[slots] = True
        self.ref[slots] = 0
        with CLOCK("index"):
            self.index.insert(keys, slots)

    def free(self, slots: np.ndarray) -> None:
        """Return slots from :meth:`take` that were never assigned."""
        n = len(slots)
        self._free[self._nfree:self._nfree + n] = slots
        self._nfree += n

    def release(self, slots: np.ndarray) -> None:
        """Unmap unpinned slots and return them to the free list (their rows left the tier)."""
        self.index.delete(self.keys[slots])
        self.occupied[slots] = False
        self.ref[slots] = 0
        self.free(slots)

    def _victims(self, need: int) -> np.ndarray:
        """Sweep from the hand, taking unpinned rows whose use count is zero and counting the
        others down by one."""
        cap = self.capacity
        found: list[np.ndarray] = []
        got = 0
        swept = 0
        while got < need:
            if swept > (MAX_USES + 1) * cap:  # every count reaches zero within MAX_USES laps
                if found:
                    self.unpin(np.concatenate(found))
                raise RuntimeError(
                    f"{self.what} cannot free {need} slots: its {cap} slots are pinned or needed by this "
                    "batch; raise the cache budget or lower the batch size"
                )
            k = min(cap, max(4 * (need - got), 4096))
            chunk = (self._hand + np.arange(k)) % cap
            cand = (self.ref[chunk] == 0) & (self.pins[chunk] == 0) & self.occupied[chunk]
            csum = np.cumsum(cand)
            if csum[-1] >= need - got:
                cut = int(np.searchsorted(csum, need - got)) + 1
            else:
                cut = k
            passed = chunk[:cut]
            v = passed[cand[:cut]]
            self.pin(v)  # chosen: not a candidate again on a later lap
            found.append(v)
            got += len(v)
            r = self.ref[passed]
            self.ref[passed] = r - (r > 0)
            self._hand = int((self._hand + cut) % cap)
            swept += cut
        victims = np.concatenate(found)
        self.unpin(victims)
        return victims
