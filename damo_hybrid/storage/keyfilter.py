"""A record of the keys a table has stored, so that a miss for a never-stored key skips RocksDB.

Most misses of a CTR stream are keys seen for the first time. RocksDB answers them from its
own bloom filters, but only after a multi-get has encoded each key, crossed into RocksDB and
come back with a ``None``: about 1 us per key of CPU (more under load); in steady state most
of the read threads' CPU. :class:`StoredKeyFilter` answers "certainly never
stored" in about 20 ns per key, vectorized, so the storage is asked only for keys that may be
on disk.

It is a blocked Bloom filter: one 64-bit word per key, chosen by a hash, with four bits of that
word set. A key added is always reported (no false negatives), so using it never changes a
result; a false positive only costs the read it would have cost anyway: 1 to 3% of
never-stored keys pass. The filter grows with the table (4 to 8 bytes per stored row) up to
``StoreConfig.key_filter_mb``; a table that outgrows that stays correct and only loses part of
the saving.

The filter must hold every stored key, so the store saves it only with a clean registry (at
close and in checkpoints) under a token written into ``meta.json``; after a crash, or for a
storage whose history it does not know, it is rebuilt from a scan of the keys.

Thread safety: any thread (adds are serialised; a concurrent reader sees a superset of what
was added before its call).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ..errors import DamoHybridError
from ..keys.hashing import mix64
from .files import atomic_file

__all__ = ["StoredKeyFilter", "FILTER_DIR", "filter_path", "remove_stale"]

FILTER_DIR = "keyfilter"  # beside meta.json: <table id>-<token>.npy

_SHIFT6 = np.uint64(6)
_LOW6 = np.uint64(63)
_ONE = np.uint64(1)


class StoredKeyFilter:
    """Which keys of one table may be stored.

    It starts small and doubles as the table's row count grows, keeping at least 32 bits per
    stored row, up to ``max_bytes``; doubling copies each word into its two halves, so every
    key added before is still reported (and keeps the bits it had: each doubling adds a little
    to the false-positive rate, about 1% at 10^6 rows and 3% at 10^7).

    Args:
        max_bytes: the most it may grow to (bytes; at least 8).
        words: the filter's uint64 words to start from (a saved filter), a power-of-two count.
    """

    START_BYTES = 1 << 16
    BITS_PER_ROW = 32

    def __init__(self, max_bytes: int, words: np.ndarray | None = None) -> None:
        self.max_words = 1 << max(0, (max(8, int(max_bytes)) // 8).bit_length() - 1)
        if words is None:
            words = np.zeros(min(self.max_words, self.START_BYTES // 8), dtype=np.uint64)
        if words.dtype != np.uint64 or words.ndim != 1 or not len(words) or len(words) & (len(words) - 1):
            raise DamoHybridError("a stored-key filter must be a 1-D uint64 array of a power-of-two length")
        self.max_words = max(self.max_words, len(words))
        self._state = self._make_state(words)  # (words, shift): read once per call, swapped whole
        self._lock = threading.Lock()

    @staticmethod
    def _make_state(words: np.ndarray) -> tuple[np.ndarray, np.uint64]:
        return words, np.uint64(64 - (len(words).bit_length() - 1))

    @property
    def words(self) -> np.ndarray:
        return self._state[0]

    @staticmethod
    def _locate(state: tuple[np.ndarray, np.uint64], keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(word index int64 (N,), mask uint64 (N,))`` of each key."""
        words, shift = state
        h = mix64(keys)
        # a one-word filter: shifting by 64 is undefined, every key maps to word 0
        idx = (h >> shift).astype(np.int64) if len(words) > 1 else np.zeros(len(h), np.int64)
        mask = _ONE << (h & _LOW6)
        for _ in range(3):
            h >>= _SHIFT6
            mask |= _ONE << (h & _LOW6)
        return idx, mask

    def add(self, keys: np.ndarray, rows: int = 0) -> None:
        """Record keys (uint64 (N,)) as stored; call before they are written.

        Args:
            rows: the table's stored row count with these keys: the filter grows to keep 32
                bits per row (up to its maximum).
        """
        if not len(keys):
            return
        with self._lock:
            words = self._state[0]
            if 64 * len(words) < self.BITS_PER_ROW * rows and len(words) < self.max_words:
                n = len(words)
                while 64 * n < self.BITS_PER_ROW * rows and n < self.max_words:
                    n *= 2
                # word i of 2^k covers words i * r .. (i + 1) * r - 1 of 2^(k + j): copy it into each
                words = np.repeat(words, n // len(words))
                self._state = self._make_state(words)
            idx, mask = self._locate(self._state, keys)
            np.bitwise_or.at(self._state[0], idx, mask)

    def may_contain(self, keys: np.ndarray) -> np.ndarray:
        """bool (N,): False where the key was certainly never added."""
        state = self._state
        idx, mask = self._locate(state, keys)
        return (state[0][idx] & mask) == mask

    def bits_per_row(self, rows: int) -> float:
        """Filter bits per stored row (below ~8 the filter lets many never-stored keys through)."""
        return 64.0 * len(self.words) / max(rows, 1)

    # ------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        """Write atomically (the caller names the file with its token)."""
        with self._lock:
            words = self._state[0].copy()
        with atomic_file(path) as f:
            np.save(f, words, allow_pickle=False)

    @classmethod
    def load(cls, path: Path, max_bytes: int) -> StoredKeyFilter | None:
        """The filter saved at ``path``, or None if it is missing or unreadable (then rebuild it)."""
        try:
            words = np.load(path, allow_pickle=False)
            return cls(max_bytes, words)
        except Exception:  # missing, empty, truncated or foreign: rebuilt from a scan
            return None


def filter_path(root: Path, table_id: int, token: str) -> Path:
    return root / FILTER_DIR / f"{table_id}-{token}.npy"


def remove_stale(root: Path, keep: set[str]) -> None:
    """Delete filter files of ``root`` other than ``keep`` (file names)."""
    d = root / FILTER_DIR
    if d.is_dir():
        for p in d.iterdir():
            if p.name not in keep:
                try:
                    os.remove(p)
                except OSError:
                    pass
