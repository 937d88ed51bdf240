"""Slot bookkeeping shared by the cache tiers (host memory, device memory).

A tier holds rows in a fixed slab of ``capacity`` slots. :class:`SlotPool` keeps which key
sits in which slot (a vectorized :class:`~damo_hybrid.cache.keyindex.KeyIndex`), the free slots,
pin counts (rows of batches in flight, never evicted) and the replacement policy. The tier owns
the row data; the pool only says which slots to reuse and calls the tier back to evict them.

**Replacement** follows S3-FIFO (Yang et al., SOSP 2023) on vectorized arrays. A CTR stream's
long tail brings keys seen once: on the synthetic Criteo stream 18.5k of a step's 50.7k keys
are new, and most never come back. So:

- a row enters on *probation*, in first-in first-out order, unless its key was evicted from
  probation a short while ago (the *ghost* record, two generations of a Bloom filter holding
  about ``capacity`` keys): such a key is back, and enters the main part directly;
- a batch that finds a row resident promotes it to the main part and counts a use (up to
  :data:`MAX_USES`);
- victims come first from the oldest probation rows while more than :data:`PROBATION` of the
  slots are on probation, then from the main part by a CLOCK with use counts: the hand takes one
  off each slot it passes and evicts slots at zero.

Simulated on the synthetic Criteo stream with this pool, against a one-bit CLOCK that entered
rows referenced: hit rate 0.495 -> 0.586 at a host cache of 25% of the table's bytes, 0.30 ->
0.41 at 5% (Belady's optimum at 25%: 0.69). The policy only orders evictions: any unpinned row
may go, so a batch fits whenever its rows do.

Thread safety: pins are guarded by a lock (the worker thread unpins while the host-manager
thread evicts); everything else needs one caller at a time.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numba
import numpy as np

from ..errors import CacheFullError
from ..keys.kernels import mix
from ..timing import CLOCK
from .keyindex import KeyIndex

__all__ = ["SlotPool", "MAX_USES", "PROBATION"]

MAX_USES = 3  # laps of the hand a main row earns at most (more measured no better)
PROBATION = 0.1  # share of the slots kept on probation before the main part gives rows up
# bits per key of each ghost generation: two probes give ~3.3% false positives in a full
# generation, ~6.5% for a key asked of both (a new key then skips probation)
_GHOST_BITS = 10


@numba.njit(nogil=True, cache=True)
def _ghost_add(bits: np.ndarray, keys: np.ndarray) -> None:
    m = np.uint64(len(bits) * 64)
    for i in range(len(keys)):
        h = mix(keys[i] ^ np.uint64(0x6A09E667F3BCC909))
        for p in (h % m, (h >> np.uint64(32)) % m):
            bits[p >> np.uint64(6)] |= np.uint64(1) << (p & np.uint64(63))


@numba.njit(nogil=True, cache=True)
def _ghost_has(a: np.ndarray, b: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    m = np.uint64(len(a) * 64)
    one = np.uint64(1)
    for i in range(len(keys)):
        h = mix(keys[i] ^ np.uint64(0x6A09E667F3BCC909))
        p, q = h % m, (h >> np.uint64(32)) % m
        wp, bp, wq, bq = p >> np.uint64(6), p & np.uint64(63), q >> np.uint64(6), q & np.uint64(63)
        out[i] = ((a[wp] >> bp) & (a[wq] >> bq) & one) != 0 or ((b[wp] >> bp) & (b[wq] >> bq) & one) != 0


class _Ghost:
    """Keys recently evicted from probation: about ``n`` of them, in two Bloom generations."""

    def __init__(self, n: int) -> None:
        self.half = max(1, n // 2)
        words = max(1, -(-self.half * _GHOST_BITS // 64))
        self.cur, self.old = np.zeros(words, np.uint64), np.zeros(words, np.uint64)
        self.added = 0

    def add(self, keys: np.ndarray) -> None:
        if self.added >= self.half:  # the older generation is forgotten
            self.cur, self.old = self.old, self.cur
            self.cur[:] = 0
            self.added = 0
        _ghost_add(self.cur, np.ascontiguousarray(keys, dtype=np.uint64))
        self.added += len(keys)

    def has(self, keys: np.ndarray) -> np.ndarray:
        out = np.empty(len(keys), dtype=np.bool_)
        _ghost_has(self.cur, self.old, np.ascontiguousarray(keys, dtype=np.uint64), out)
        return out

    @staticmethod
    def nbytes_per_row() -> float:
        return 2 * _GHOST_BITS / 8 / 2


class SlotPool:
    """Key -> slot mapping with a free list, pins and S3-FIFO replacement (see the module doc).

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
        self.ref = np.zeros(capacity, dtype=np.uint8)  # use counts of main rows
        self.probation = np.zeros(capacity, dtype=bool)
        self._on_probation = 0  # count_nonzero(probation), kept up to date
        # the probation queue entry each slot was last queued in: an older entry holding the slot
        # (it left and came back since) is stale for it
        self._entry = np.full(capacity, -1, dtype=np.int64)
        self._entries = 0  # entries queued so far
        self.pins = np.zeros(capacity, dtype=np.int32)
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # a stack: pop from the end
        self._nfree = capacity
        self._hand = 0
        # slots that entered on probation, oldest batch first, as (entry number, slots); a slot
        # goes stale in its entry when its row is promoted, evicted by the hand or queued again
        # (then skipped), so the queue is bounded by trimming
        self._fifo: deque[tuple[int, np.ndarray]] = deque()
        self._fifo_off = 0  # entries of the oldest batch already examined
        self._fifo_len = 0
        self._probation_max = int(PROBATION * capacity)
        self._ghost = _Ghost(capacity)
        self.lock = threading.Lock()

    @staticmethod
    def nbytes_per_row() -> float:
        """Host bytes one slot costs in the pool: key, pins, flags, key index, queue, ghost."""
        return 8 + 4 + 3 + 8 + 8 + KeyIndex.nbytes_per_key() + 4 + _Ghost.nbytes_per_row()

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """uint64 (N,) -> int64 (N,) slots, -1 where absent."""
        with CLOCK("index"):
            return self.index.lookup(keys)

    def touch(self, slots: np.ndarray) -> None:
        """Count a use of distinct resident slots (a batch found their rows resident): a row on
        probation is promoted to the main part."""
        self.ref[slots] = np.minimum(self.ref[slots], MAX_USES - 1) + 1
        self._leave_probation(slots)

    def pin(self, slots: np.ndarray) -> None:
        with self.lock:
            self.pins[slots] += 1

    def unpin(self, slots: np.ndarray) -> None:
        with self.lock:
            self.pins[slots] -= 1

    def take(self, n: int, evict: Callable[[np.ndarray], None]) -> np.ndarray:
        """``n`` slots to fill: free ones first, then victims.

        ``evict(victims)`` is called while the victims still hold their keys (to write dirty
        rows back); they are then unmapped. The caller maps the returned slots with
        :meth:`assign`.

        Raises:
            CacheFullError (a RuntimeError): fewer than ``n`` slots are unpinned.
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
        """Map distinct ``keys`` to the slots :meth:`take` gave: on probation, or in the main
        part for a key the ghost record says was evicted from probation lately."""
        self.keys[slots] = keys
        self.occupied[slots] = True
        self.ref[slots] = 0
        back = self._ghost.has(keys)
        self._leave_probation(slots[back])
        entered = slots[~back]
        if len(entered):
            self._on_probation += len(entered) - int(np.count_nonzero(self.probation[entered]))
            self.probation[entered] = True
            self._queue(entered)
            while self._fifo_len > self.capacity:  # bound the queue: its oldest batch joins the main part
                e, head = self._fifo.popleft()
                head = head[self._fifo_off:]
                self._fifo_off = 0
                self._fifo_len -= len(head)
                self._leave_probation(head[self._entry[head] == e])
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
        self._leave_probation(slots)
        self.free(slots)

    def _victims(self, need: int) -> np.ndarray:
        """Unpinned slots to reuse: the oldest probation rows while too many are on probation,
        then the main part's CLOCK (see the module doc)."""
        found: list[np.ndarray] = []
        got = self._from_probation(need, found)
        cap = self.capacity
        swept = 0
        while got < need:
            if swept > (MAX_USES + 1) * cap:  # every count reaches zero within MAX_USES laps
                if found:
                    self.unpin(np.concatenate(found))
                raise CacheFullError(
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
            on = v[self.probation[v]]
            if len(on):  # the hand passed probation rows: they leave as unused
                self._ghost.add(self.keys[on])
                self._leave_probation(on)
            r = self.ref[passed]
            self.ref[passed] = r - (r > 0)
            self._hand = int((self._hand + cut) % cap)
            swept += cut
        victims = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        self.unpin(victims)
        return victims

    def _from_probation(self, need: int, found: list[np.ndarray]) -> int:
        """Victims from the probation queue, oldest first, while more than the probation share
        of the slots are on probation; pinned ones go to the back of the queue. Returns how many."""
        excess = self._on_probation - self._probation_max
        got = 0
        requeue: list[np.ndarray] = []
        while got < need and excess > 0 and self._fifo:
            e, head = self._fifo[0]
            c = head[self._fifo_off:].astype(np.int64)
            valid = self.probation[c] & self.occupied[c] & (self._entry[c] == e)
            cand = valid & (self.pins[c] == 0)
            want = min(need - got, excess)
            csum = np.cumsum(cand)
            cut = int(np.searchsorted(csum, want)) + 1 if len(c) and csum[-1] >= want else len(c)
            seen, cand, valid = c[:cut], cand[:cut], valid[:cut]
            v = seen[cand]  # distinct: a slot is current in one entry only
            requeue.append(seen[valid & ~cand])
            self._leave_probation(v)
            self.pin(v)
            found.append(v)
            got += len(v)
            excess -= len(v)
            self._ghost.add(self.keys[v])
            self._fifo_off += cut
            self._fifo_len -= cut
            if self._fifo_off >= len(head):
                self._fifo.popleft()
                self._fifo_off = 0
        for r in requeue:
            if len(r):
                self._queue(r)
        return got

    def _queue(self, slots: np.ndarray) -> None:
        """Queue distinct probation slots as the newest entry (stale in any older one)."""
        self._entry[slots] = self._entries
        self._fifo.append((self._entries, slots.astype(np.int32)))
        self._entries += 1
        self._fifo_len += len(slots)

    def _leave_probation(self, slots: np.ndarray) -> None:
        """Distinct slots leave probation (those on it)."""
        self._on_probation -= int(np.count_nonzero(self.probation[slots]))
        self.probation[slots] = False
