"""A vectorized uint64 -> slot hash index (open addressing, linear probing).

Every operation takes a whole batch and loops in Python only over probe rounds (a handful at
load <= 0.5), never over keys: about 50 ns per key, against about 1 us for a Python dict at
10^7 keys. Deletions leave tombstones; the table rebuilds itself when live entries plus
tombstones pass 70% of its size.

Not thread-safe: its owner (one cache) serialises calls.
"""

from __future__ import annotations

import numpy as np

from ..keys.hashing import mix64

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
        self.capacity = capacity
        size = 1 << max(4, int(2 * capacity - 1).bit_length())
        self._alloc(size)

    def _alloc(self, size: int) -> None:
        self._keys = np.zeros(size, dtype=np.uint64)
        self._slots = np.full(size, _EMPTY, dtype=np.int64)
        self._claim = np.zeros(size, dtype=np.int64)  # scratch for insert's collision resolution
        self._mask = np.uint64(size - 1)
        self.live = 0
        self._tombs = 0

    def __len__(self) -> int:
        return self.live

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return (mix64(keys) & self._mask).astype(np.int64)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in the table and slots of ``keys``.

        Args:
            keys: uint64 (N,).
        Returns:
            ``(pos int64 (N,), slot int64 (N,))``; slot is -1 where the key is absent
            (pos is then meaningless).
        """
        n = len(keys)
        slot = np.full(n, _EMPTY, dtype=np.int64)
        pos = self._home(keys)
        active = np.arange(n)
        mask = int(self._mask)
        while len(active):
            p = pos[active]
            s = self._slots[p]
            hit = (s >= 0) & (self._keys[p] == keys[active])
            slot[active[hit]] = s[hit]
            go_on = ~hit & (s != _EMPTY)
            active = active[go_on]
            pos[active] = (p[go_on] + 1) & mask
        return pos, slot

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """int64 (N,) slots of ``keys``, -1 where absent."""
        return self.find(keys)[1]

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Add keys that are not in the index.

        Args:
            keys: uint64 (N,) distinct and absent (checked only by assertion cost-free paths).
            slots: int64 (N,) >= 0.
        """
        n = len(keys)
        if n == 0:
            return
        if self.live + self._tombs + n > 0.7 * len(self._slots):
            self._rebuild(extra=n)
        pos = self._home(keys)
        todo = np.arange(n)
        mask = int(self._mask)
        while len(todo):
            p = pos[todo]
            free = self._slots[p] < 0
            cand = todo[free]
            cp = p[free]
            # batch members aiming at the same free position: scatter their ids, the one
            # whose id stuck wins (no sort needed)
            self._claim[cp] = cand
            won_mask = self._claim[cp] == cand
            won, wp = cand[won_mask], cp[won_mask]
            self._tombs -= int(np.count_nonzero(self._slots[wp] == _TOMB))
            self._keys[wp] = keys[won]
            self._slots[wp] = slots[won]
            placed = np.zeros(n, dtype=bool)
            placed[won] = True
            todo = todo[~placed[todo]]
            pos[todo] = (pos[todo] + 1) & mask
        self.live += n

    def delete(self, keys: np.ndarray) -> np.ndarray:
        """Remove keys; returns bool (N,) which were present."""
        pos, slot = self.find(keys)
        present = slot >= 0
        p = pos[present]
        self._slots[p] = _TOMB
        k = int(present.sum())
        self.live -= k
        self._tombs += k
        return present

    def _rebuild(self, extra: int = 0) -> None:
        live = self._slots >= 0
        keys, slots = self._keys[live], self._slots[live]
        size = len(self._slots)
        while (len(keys) + extra) > 0.5 * size:
            size *= 2
        self._alloc(size)
        self.insert(keys, slots)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(keys uint64 (L,), slots int64 (L,))``."""
        live = self._slots >= 0
        return self._keys[live].copy(), self._slots[live].copy()
