"""A uint64 -> slot hash index (open addressing, linear probing), compiled.

Every operation takes a whole batch and runs one compiled loop over its keys (numba, without the
GIL, so the writer and the worker run beside it): about 20 ns per key, against about 1 us for a
Python dict at 10^7 keys. Deletions leave tombstones; the table rebuilds itself when live entries
plus tombstones pass 70% of its size.

The table has exactly twice as many entries as the index's capacity (a key's home is
``(hash32 * size) >> 32``, so any size works), each a uint64 key and an int32 slot: 24 bytes per
key held, which the caches' budgets count (:meth:`KeyIndex.nbytes_per_key`).

Not thread-safe: its owner (one cache) serialises calls.
"""

from __future__ import annotations

import numba
import numpy as np

from ..keys.kernels import mix

__all__ = ["KeyIndex"]

_EMPTY = -1
_TOMB = -2


class KeyIndex:
    """Maps distinct uint64 keys to int64 slots.

    Args:
        capacity: most live keys it will hold; the table has the next power of two
            at least twice that.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if capacity >= 1 << 30:
            raise ValueError(f"capacity must be < 2**30 (slots are int32), got {capacity}")
        self.capacity = capacity
        self._alloc(max(16, 2 * capacity))

    @staticmethod
    def nbytes_per_key() -> int:
        """Bytes of table per key of capacity: two entries of a uint64 key and an int32 slot."""
        return 2 * (8 + 4)

    def _alloc(self, size: int) -> None:
        self._keys = np.zeros(size, dtype=np.uint64)
        self._slots = np.full(size, _EMPTY, dtype=np.int32)
        self.live = 0
        self._tombs = 0

    def __len__(self) -> int:
        return self.live

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in the table and slots of ``keys``.

        Args:
            keys: uint64 (N,).
        Returns:
            ``(pos int64 (N,), slot int64 (N,))``; slot is -1 where the key is absent
            (pos is then meaningless).
        """
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        pos = np.empty(len(keys), dtype=np.int64)
        slot = np.empty(len(keys), dtype=np.int64)
        _find(self._keys, self._slots, keys, pos, slot)
        return pos, slot

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """int64 (N,) slots of ``keys``, -1 where absent."""
        return self.find(keys)[1]

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Add keys that are not in the index.

        Args:
            keys: uint64 (N,) distinct and absent (not checked).
            slots: int64 (N,) >= 0.
        """
        n = len(keys)
        if n == 0:
            return
        if self.live + self._tombs + n > 0.7 * len(self._slots):
            self._rebuild(extra=n)
        reused = _insert(self._keys, self._slots, np.ascontiguousarray(keys, dtype=np.uint64),
                         np.ascontiguousarray(slots, dtype=np.int32))
        self._tombs -= reused
        self.live += n

    def delete(self, keys: np.ndarray) -> np.ndarray:
        """Remove keys; returns bool (N,) which were present."""
        present = np.empty(len(keys), dtype=np.bool_)
        k = _delete(self._keys, self._slots, np.ascontiguousarray(keys, dtype=np.uint64), present)
        self.live -= k
        self._tombs += k
        return present

    def _rebuild(self, extra: int = 0) -> None:
        live = self._slots >= 0
        keys, slots = self._keys[live], self._slots[live]
        size = len(self._slots)
        while (len(keys) + extra) > 0.5 * size:  # more keys than the capacity: grow
            size *= 2
        self._alloc(size)
        self.insert(keys, slots)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(keys uint64 (L,), slots int64 (L,))``."""
        live = self._slots >= 0
        return self._keys[live].copy(), self._slots[live].astype(np.int64)


@numba.njit(nogil=True, cache=True, inline="always")
def _home(k: np.uint64, size: int) -> int:
    """A key's first position: the high 32 bits of its hash scaled to ``size`` (< 2**32)."""
    return np.int64(((mix(k) >> np.uint64(32)) * np.uint64(size)) >> np.uint64(32))


@numba.njit(nogil=True, cache=True)
def _probe(tkeys: np.ndarray, tslots: np.ndarray, k: np.uint64) -> tuple[int, int]:
    """(position, slot) of ``k``: its entry, or the empty position that ends its probe (slot -1)."""
    size = len(tslots)
    p = _home(k, size)
    while True:
        s = tslots[p]
        if s == _EMPTY:
            return p, -1
        if s >= 0 and tkeys[p] == k:
            return p, s
        p += 1
        if p == size:
            p = 0


@numba.njit(nogil=True, cache=True)
def _find(tkeys, tslots, keys, pos, slot) -> None:
    for i in range(len(keys)):
        pos[i], slot[i] = _probe(tkeys, tslots, keys[i])


@numba.njit(nogil=True, cache=True)
def _insert(tkeys, tslots, keys, slots) -> int:
    """Place absent keys at their first free (empty or tombstone) position; returns the
    tombstones reused."""
    size = len(tslots)
    reused = 0
    for i in range(len(keys)):
        p = _home(keys[i], size)
        while tslots[p] >= 0:
            p += 1
            if p == size:
                p = 0
        if tslots[p] == _TOMB:
            reused += 1
        tkeys[p] = keys[i]
        tslots[p] = slots[i]
    return reused


@numba.njit(nogil=True, cache=True)
def _delete(tkeys, tslots, keys, present) -> int:
    gone = 0
    for i in range(len(keys)):
        p, s = _probe(tkeys, tslots, keys[i])
        present[i] = s >= 0
        if s >= 0:
            tslots[p] = _TOMB
            gone += 1
    return gone
