"""Write-behind of evicted rows: a background thread writes them to the storage.

The host tier hands a batch of evicted dirty rows to :meth:`WriteBehind.submit` and goes on.
Until the batch is on disk, :meth:`WriteBehind.overlay` serves those rows to readers (the
newest submission wins), so a row evicted and needed again right away is never read stale
from RocksDB. The queue is bounded: when the writer falls behind, ``submit`` waits.

Nothing is dropped on a failed write. A write that fails (a full disk, say) stops the
writer; the failed batch and every batch behind it stay in memory, still served by
:meth:`overlay`, and the error is raised by the next ``submit`` or ``drain`` in the caller's
thread with the original as its cause. A later :meth:`drain` (after the user freed disk
space, say) writes the held batches again, in order, and clears the error once they land.

A batch goes to the storage in chunks of :data:`WRITE_CHUNK` rows with a short sleep between
them: rocksdict holds the GIL through a whole write, so one write of a 25k-row eviction batch
stalled every other Python thread (the worker's forward among them) for 30-90 ms; a chunk holds
it for about a millisecond. Each chunk is written once: a failed batch is retried from its first
unwritten chunk.

Thread safety: ``submit``, ``overlay`` and ``drain`` are called by the table's owner (the host
manager, or the store between steps); the writer thread only writes and retires batches.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import WriteBackError
from ..rows.codec import Rows
from ..storage.rowio import TableIO

__all__ = ["WriteBehind", "WRITE_CHUNK"]

WRITE_CHUNK = 1024  # rows per storage write: the longest the writer holds the GIL at a time
_YIELD_S = 2e-4  # between chunks: long enough for a thread waiting for the GIL to take it


@dataclass(eq=False)
class _Pending:
    keys: np.ndarray  # uint64 (M,) sorted
    rows: Rows
    new: np.ndarray
    done: int = 0  # rows written so far (a retry starts here)


class WriteBehind:
    """One table's background writer.

    Args:
        io: where the rows go.
        depth: batches queued at most before ``submit`` waits.
    """

    def __init__(self, io: TableIO, depth: int = 4) -> None:
        self.io = io
        self.name = io.table.name
        self._q: queue.Queue[_Pending | None] = queue.Queue(maxsize=depth)
        self._pending: list[_Pending] = []  # submitted, not yet written (oldest first)
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
                    self._write(item)
                    with self._lock:
                        self._pending.remove(item)
                # after a failure every later batch stays pending, in order, for drain() to retry
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e
            finally:
                self._q.task_done()

    def _write(self, item: _Pending, pause: float = _YIELD_S) -> None:
        """Write what is left of a batch, chunk by chunk, releasing the GIL for ``pause`` seconds
        between chunks (the writer's thread; a retry in the caller's thread does not wait)."""
        n = len(item.keys)
        while item.done < n:
            c = slice(item.done, min(n, item.done + WRITE_CHUNK))
            self.io.write(item.keys[c], item.rows.take(c), item.new[c])
            item.done = c.stop
            if item.done < n and pause:
                time.sleep(pause)

    def _raise(self) -> None:
        if self._error is not None:
            n = self.held
            raise WriteBackError(
                f"writing evicted rows of table {self.name!r} failed: {self._error}; {n} rows are held in "
                "memory, not lost: fix the cause (free disk space, say) and flush or close the store again"
            ) from self._error

    def check(self) -> None:
        """Raise :class:`WriteBackError` if an earlier write failed (its rows are still held)."""
        self._raise()

    @property
    def held(self) -> int:
        """Rows submitted and not yet written."""
        with self._lock:
            return sum(len(p.keys) for p in self._pending)

    def submit(self, keys: np.ndarray, rows: Rows, new: np.ndarray) -> None:
        """Queue rows for writing; returns at once unless the queue is full.

        Args:
            keys: uint64 (M,) distinct.
            rows: M rows (copies: the caller may reuse its slots).
            new: bool (M,) rows not stored yet.
        Raises:
            WriteBackError: an earlier write failed (these rows are not taken then).
        """
        self._raise()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"damo-writer-{self.name}", daemon=True)
            self._thread.start()
        order = np.argsort(keys)
        item = _Pending(keys[order], rows.take(order), new[order])
        with self._lock:
            self._pending.append(item)
        self._q.put(item)

    def overlay(self, keys: np.ndarray) -> tuple[Rows | None, np.ndarray]:
        """Rows of ``keys`` that are submitted but maybe not yet written (also after a failure).

        Args:
            keys: uint64 (N,).
        Returns:
            ``(rows, hit)``: rows of the M hits in the order of ``keys[hit]`` (None when
            M = 0) and bool (N,) ``hit``.
        """
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
        if not hit.any():
            return None, hit
        out = Rows.empty(n, pending[0].rows.weights.shape[1], pending[0].rows.state.shape[1])
        for idx, p, pos in src:
            out.put(idx, p.rows.take(pos))
        return out.take(hit), hit

    def drain(self) -> None:
        """Wait until every submitted batch is written, and stop the thread.

        After a failure, writes the held batches again (in order, in this thread).

        Raises:
            WriteBackError: a write failed; the unwritten rows stay held.
        """
        if self._thread is not None and self._thread.is_alive():
            self._q.join()
            self._q.put(None)
            self._thread.join()
        self._thread = None
        if self._error is not None:
            while True:
                with self._lock:
                    if not self._pending:
                        break
                    item = self._pending[0]
                try:
                    self._write(item, pause=0.0)
                except BaseException as e:
                    self._error = e
                    self._raise()
                with self._lock:
                    self._pending.pop(0)
            self._error = None
