"""Byte-level row storage: the :class:`Storage` protocol and :class:`MemoryStorage`, its reference model.

A storage maps ``(table_id, key)`` to an opaque row value. Keys on disk are 12
bytes: the table id as big-endian uint32, then the key as big-endian uint64,
so a table's rows are contiguous and sorted by key, and the full 64-bit key
space of every table is distinct.

Neither implementation is thread-safe; the store that owns one serialises
calls to it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from ..errors import StoreClosedError

__all__ = ["Storage", "MemoryStorage", "encode_keys", "decode_keys"]

_KEY_DTYPE = np.dtype([("table", ">u4"), ("key", ">u8")])


def encode_keys(table_id: int, keys: np.ndarray) -> list[bytes]:
    """12-byte storage keys.

    Args:
        table_id: the table's numeric id.
        keys: uint64 (N,).
    Returns:
        N byte strings.
    """
    arr = np.empty(len(keys), dtype=_KEY_DTYPE)
    arr["table"] = table_id
    arr["key"] = keys
    return arr.view("V12").tolist()


def decode_keys(raw: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(raw), dtype=_KEY_DTYPE)["key"].astype(np.uint64)


class Storage(Protocol):
    """What the embedding store needs from a storage backend."""

    def get(self, table_id: int, keys: np.ndarray) -> list[bytes | None]:
        """Values of ``keys`` (uint64 (N,)); ``None`` where absent."""
        ...

    def put(self, table_id: int, keys: np.ndarray, values: list[bytes], log: bool = True) -> None:
        """Write N values atomically (all or nothing). ``log=False``: the write may skip the
        write-ahead log, so that it is durable only from the next :meth:`flush` on."""
        ...

    def delete(self, table_id: int, keys: np.ndarray) -> None:
        """Remove keys atomically; absent keys are ignored."""
        ...

    def scan(self, table_id: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """All rows of a table in key order, as (uint64 keys (M,), M values) chunks."""
        ...

    def drop_table(self, table_id: int) -> None:
        """Remove every row of a table."""
        ...

    def flush(self) -> None:
        """Make every write durable."""
        ...

    def disk_bytes(self) -> int:
        """Approximate bytes used."""
        ...

    def checkpoint(self, path: str) -> None:
        """Write a consistent copy to ``path`` (which must not exist)."""
        ...

    def compact(self) -> None:
        """Reclaim deleted rows (and, with a TTL, expired ones); a no-op where nothing is on disk."""
        ...

    def wait_for_compactions(self, timeout: float = 300.0) -> float:
        """Block until no background compaction runs or is pending; returns the seconds waited."""
        ...

    def running_compactions(self) -> int:
        """Background compactions running now."""
        ...

    def close(self) -> None:
        """Release the storage; later calls raise StoreClosedError."""
        ...


class MemoryStorage:
    """The reference model: a dict per table. Nothing is persisted.

    ``checkpoint`` writes a single ``.npz``-free pickle-free file of raw rows so
    that the store's checkpoint logic can be exercised against it too.
    """

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, bytes]] = {}
        self._closed = False
        self._lock = threading.Lock()  # thread-safe like RocksDB: a batch is atomic, a scan a snapshot

    def _t(self, table_id: int) -> dict[int, bytes]:
        if self._closed:
            raise StoreClosedError("storage is closed")
        return self._tables.setdefault(table_id, {})

    def get(self, table_id: int, keys: np.ndarray) -> list[bytes | None]:
        with self._lock:
            t = self._t(table_id)
            return [t.get(k) for k in keys.tolist()]

    def put(self, table_id: int, keys: np.ndarray, values: list[bytes], log: bool = True) -> None:
        with self._lock:
            self._t(table_id).update(zip(keys.tolist(), values))

    def delete(self, table_id: int, keys: np.ndarray) -> None:
        with self._lock:
            t = self._t(table_id)
            for k in keys.tolist():
                t.pop(k, None)

    def scan(self, table_id: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        with self._lock:
            t = dict(self._t(table_id))
        ks = sorted(t)
        for i in range(0, len(ks), batch):
            chunk = ks[i:i + batch]
            yield np.array(chunk, dtype=np.uint64), [t[k] for k in chunk]

    def drop_table(self, table_id: int) -> None:
        self._t(table_id).clear()

    def flush(self) -> None:
        self._t(0)

    def disk_bytes(self) -> int:
        return sum(len(v) + 12 for t in self._tables.values() for v in t.values())

    def checkpoint(self, path: str) -> None:
        raise NotImplementedError("MemoryStorage keeps nothing on disk; checkpoint a RocksDB store")

    def compact(self) -> None:
        self._t(0)

    def wait_for_compactions(self, timeout: float = 300.0) -> float:
        return 0.0

    def running_compactions(self) -> int:
        return 0

    def close(self) -> None:
        self._closed = True
