"""Frequency admission with a counting Bloom filter.

Each table with an :class:`~damo_hybrid.config.AdmissionConfig` owns one
filter of saturating uint8 counters. A key's count is the minimum of its
``k`` counters, so it is never under-counted; a false positive (probability
about ``fpr`` at ``capacity`` distinct keys) can only admit a key early.

Sizing follows the standard Bloom formulas:
``m = ceil(-capacity * ln(fpr) / ln(2)**2)`` counters and
``k = max(1, round(m / capacity * ln 2))`` hashes. Positions use double hashing
``(h1 + i * h2) mod m`` of ``mix64`` of the key, with ``h2`` odd.

Not thread-safe: the store calls it under its own lock.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import AdmissionConfig
from ..keys.hashing import mix64

__all__ = ["CountingBloomFilter"]

_SALT2 = np.uint64(0x632BE59BD9B4E019)


class CountingBloomFilter:
    """Approximate per-key occurrence counts, saturating at 255.

    Args:
        capacity: expected distinct keys.
        fpr: target false-positive rate at ``capacity``.
        counters: an existing counter array to resume from (uint8 (m,)).
    """

    def __init__(self, capacity: int, fpr: float, counters: np.ndarray | None = None) -> None:
        m = int(math.ceil(-capacity * math.log(fpr) / (math.log(2) ** 2)))
        self.m = max(m, 64)
        self.k = max(1, int(round(self.m / capacity * math.log(2))))
        if counters is not None:
            if counters.dtype != np.uint8 or counters.shape != (self.m,):
                raise ValueError(
                    f"admission counters have shape {counters.shape} and dtype {counters.dtype}, "
                    f"expected ({self.m},) uint8 for capacity={capacity}, fpr={fpr}"
                )
            self.counters = counters
        else:
            self.counters = np.zeros(self.m, dtype=np.uint8)

    @classmethod
    def from_config(cls, cfg: AdmissionConfig, counters: np.ndarray | None = None) -> CountingBloomFilter:
        return cls(cfg.capacity, cfg.fpr, counters)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """int64 (N, k) counter positions."""
        m = np.uint64(self.m)
        h1 = mix64(keys) % m
        h2 = (mix64(keys ^ _SALT2) % m) | np.uint64(1)
        i = np.arange(self.k, dtype=np.uint64)
        return ((h1[:, None] + i[None, :] * h2[:, None]) % m).astype(np.int64)

    def add(self, keys: np.ndarray, counts: np.ndarray | int = 1) -> np.ndarray:
        """Add occurrences and return the new counts.

        Args:
            keys: uint64 (N,) distinct keys.
            counts: int (N,) or scalar occurrences to add per key.
        Returns:
            int64 (N,) the keys' counts after adding.
        """
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64)
        pos = self._positions(keys)
        inc = np.broadcast_to(np.asarray(counts, dtype=np.int64)[..., None] if np.ndim(counts) else np.int64(counts), pos.shape)
        # colliding positions add up, which can only over-count
        uniq, inv = np.unique(pos, return_inverse=True)
        total = np.bincount(inv.ravel(), weights=inc.ravel().astype(np.float64), minlength=len(uniq))
        new = np.minimum(self.counters[uniq].astype(np.int64) + total.astype(np.int64), 255)
        self.counters[uniq] = new.astype(np.uint8)
        return self.counters[pos].min(axis=1).astype(np.int64)

    def count(self, keys: np.ndarray) -> np.ndarray:
        """int64 (N,) current counts (upper bounds of the true counts)."""
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.counters[self._positions(keys)].min(axis=1).astype(np.int64)
