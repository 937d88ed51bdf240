"""Write-behind of evicted rows: a background thread writes them to the store.

The host manager hands a batch of evicted dirty rows to :meth:`WriteBehind.submit` and goes
on. Until the batch is on disk, :meth:`WriteBehind.overlay` serves those rows to readers (the
newest submission wins), so a row evicted and needed again right away is never read stale
from RocksDB. The queue is bounded: when the writer falls behind, ``submit`` waits.

A write that fails (a full disk, say) stops the writer; the error is raised by the next
``submit``, ``overlay`` or ``drain`` in the caller's thread, with the original as its cause.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np

from .errors import DamoHybridError
from .rows import Rows
from .store import EmbeddingStore

__all__ = ["WriteBehind"]


@dataclass
class _Pending:
    keys: np.ndarray  # uint64 (M,) sorted
    rows: Rows
    new: np.ndarray


class WriteBehind:
    """One table's background writer.

    Args:
        store: where rows go.
        table: table name.
        depth: batches queued at most before ``submit`` waits.
    """

    def __init__(self, store: EmbeddingStore, table: str, depth: int = 4) -> None:
        self.store, self.table = store, table
        self._q: queue.Queue[_Pending | None] = queue.Queue(maxsize=depth)
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self.store.write_rows(self.table, item.keys, item.rows, item.new)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e
            finally:
                if item is not None:
                    with self._lock:
                        self._pending.remove(item)
                self._q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise DamoHybridError(f"writing evicted rows of table {self.table!r} failed: {self._error}") from self._error

    def submit(self, keys: np.ndarray, rows: Rows, new: np.ndarray) -> None:
        """Queue rows for writing; returns at once unless the queue is full.

        Args:
            keys: uint64 (M,) distinct.
            rows: M rows (copies: the caller may reuse its slots).
            new: bool (M,) rows not stored yet.
        """
        self._raise()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"damo-writer-{self.table}", daemon=True)
            self._thread.start()
        order = np.argsort(keys)
        item = _Pending(keys[order], Rows(rows.weights[order], rows.state[order], rows.count[order],
                                          rows.created[order], rows.updated[order]), new[order])
        with self._lock:
            self._pending.append(item)
        self._q.put(item)

    def overlay(self, keys: np.ndarray) -> tuple[Rows | None, np.ndarray]:
        """Rows of ``keys`` that are queued but maybe not yet written.

        Args:
            keys: uint64 (N,).
        Returns:
            ``(rows, hit)``: rows of the M hits in the order of ``keys[hit]`` (None when
            M = 0) and bool (N,) ``hit``.
        """
        self._raise()
        n = len(keys)
        hit = np.zeros(n, dtype=bool)
        src: list[tuple[np.ndarray, _Pending, np.ndarray]] = []
        with self._lock:
            pending = list(self._pending)
        for p in reversed(pending):  # newest first
            if not len(p.keys):
                continue
            todo = np.nonzero(~hit)[0]
            pos = np.minimum(np.searchsorted(p.keys, keys[todo]), len(p.keys) - 1)
            found = p.keys[pos] == keys[todo]
            if found.any():
                src.append((todo[found], p, pos[found]))
                hit[todo[found]] = True
        m = int(hit.sum())
        if m == 0:
            return None, hit
        d, w = pending[0].rows.weights.shape[1], pending[0].rows.state.shape[1]
        out = Rows(np.empty((n, d), np.float32), np.empty((n, w), np.float32), np.empty(n, np.int64),
                   np.empty(n, np.int64), np.empty(n, np.int64))
        for idx, p, pos in src:
            out.weights[idx], out.state[idx] = p.rows.weights[pos], p.rows.state[pos]
            out.count[idx], out.created[idx], out.updated[idx] = p.rows.count[pos], p.rows.created[pos], p.rows.updated[pos]
        return Rows(out.weights[hit], out.state[hit], out.count[hit], out.created[hit], out.updated[hit]), hit

    def drain(self) -> None:
        """Wait until every queued batch is written; stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._q.join()
            self._q.put(None)
            self._thread.join()
        self._thread = None
        self._raise()
