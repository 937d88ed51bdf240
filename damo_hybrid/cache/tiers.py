"""One owner for each table's cached rows: the table's tiers.

A :class:`TableTiers` holds one table's host tier (:class:`~damo_hybrid.cache.host.HostCache`,
with its background writer) and, optionally, its device tier
(:class:`~damo_hybrid.cache.device.DeviceCache`). The store creates at most one per table and
hands the same object to every collection, model and trainer over that table, so there is one
copy of every cached row. The tiers are exclusive: a row lives in the device tier, or in the
host tier, or in the writer's queue, or only in the storage, and the highest tier holding it
is the truth. Reads through :meth:`TableTiers.read_rows` look top-down and change nothing;
:meth:`TableTiers.flush` sends every update down to the storage.

Thread safety: :attr:`TableTiers.lock` serialises residency changes (the host manager's
``prepare``, the store's reads, steps, flushes and deletions); the worker steps and unpins rows
it holds pinned without it, which is safe because pinned rows never move. The worker's step
and the store's reads, flushes and steps also take :attr:`TableTiers.step_lock` (never held
by the host manager, so it never delays ``prepare``): a flush or read never sees a row half
stepped, and a step never lands between a flush's copy of a row and its clean mark. Lock
order: the store's lock, then ``lock``, then ``step_lock``, then the storage's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..ops.cpu import sum_by_key
from ..rows.codec import Rows
from ..storage.rowio import TableIO
from .host import CacheStats, HostCache

if TYPE_CHECKING:
    from .device import DeviceCache

__all__ = ["TableTiers"]


class TableTiers:
    """One table's host tier and optional device tier.

    Args:
        io: the table's row I/O (the storage below the tiers).
        host_rows: host-tier slots.
        device_rows: device-tier slots, or None for no device tier.
        device: the device tier's ``torch.device`` (``cuda[:i]``, or ``cpu`` to run the tier's
            logic in host memory).
    """

    def __init__(self, io: TableIO, host_rows: int, device_rows: int | None = None, device: Any = None) -> None:
        self.table = io.table
        self.name = io.table.name
        self.lock = threading.RLock()
        self.step_lock = threading.Lock()
        self.closed = False  # set by the store's close(): no prepare or step after it
        self.host = HostCache(io, host_rows)
        self.device: DeviceCache | None = None
        if device_rows is not None:
            from .device import (
                DeviceCache,  # torch is imported only where a device tier exists
            )

            self.device = DeviceCache(self.host, device_rows, device)

    @property
    def device_type(self) -> Any:
        """The device tier's ``torch.device``, or None without one."""
        return self.device.device if self.device is not None else None

    # --------------------------------------------------------------- reads
    def read_rows(self, keys: np.ndarray) -> tuple[Rows, np.ndarray]:
        """The newest rows of distinct ``keys`` in whatever tier they are; moves no row (only read
        counters change).

        Args:
            keys: uint64 (N,) distinct.
        Returns:
            ``(rows, found)``: rows of the M keys that are stored or hold updates, in order;
            bool (N,) ``found``. Other keys read as their initial row.
        """
        n = len(keys)
        t = self.table
        out = Rows.empty(n, t.dim, t.width)
        found = np.zeros(n, dtype=bool)
        todo = np.arange(n)
        with self.lock, self.step_lock:
            for tier in (self.device, self.host):
                if tier is None or not len(todo):
                    continue
                rows, hit, known = tier.peek(keys[todo])
                idx = todo[hit]
                out.put(idx, rows)
                found[idx] = known
                todo = todo[~hit]
            if len(todo):
                rows, f = self.host.read_below(keys[todo])
                out.put(todo[f], rows.take(f))
                found[todo[f]] = True
        return out.take(found), found

    # --------------------------------------------------------------- steps
    def step_rows(self, keys: np.ndarray, grads: np.ndarray, lr: float) -> list[np.ndarray | None]:
        """One optimizer step of ``keys`` with already validated gradients (the store's
        ``apply_gradients`` on a cached table): duplicates summed, each row stepped once.

        Rows on the device tier are first sent down; rows in the host tier are stepped there;
        the others are read, stepped and handed to the writer without taking a slot, so a call
        may hold more keys than the cache. Every row is stepped on a copy and the results are
        checked (:meth:`~damo_hybrid.rows.table.Table.check_results`) before any is stored.

        Args:
            keys: uint64 (N,).
            grads: float32 (N, dim), finite.
            lr: the step's learning rate.
        Returns:
            The ``skip`` policy's keep masks (count them with ``Table.count_dropped``).
        Raises:
            NonFiniteUpdateError: a result overflowed under the ``raise`` policy; nothing was written.
            RuntimeError: a row is pinned by a batch in flight on the device tier.
        """
        if not len(keys):
            return []
        ukeys, inv, g = sum_by_key(keys, grads)
        t = self.table
        check = t.check_results
        with self.lock, self.step_lock:
            seen = None
            if t.admits:  # admission: counted once the step is stored, as without a cache
                seen = ukeys, np.bincount(inv, minlength=len(ukeys))
                admitted = self.admitted(ukeys, t.admit(*seen, count=False))
                ukeys, g = ukeys[admitted], g[admitted]
            kept = self._step_unique(ukeys, g, lr, check)
            if seen is not None:
                t.filter.add(*seen)  # type: ignore[union-attr]
                t.counters.dropped_unadmitted += len(seen[0]) - len(ukeys)
            return kept

    def admitted(self, keys: np.ndarray, by_count: np.ndarray) -> np.ndarray:
        """``by_count`` (bool, the counting filter's verdict on ``keys``) with every key that holds a
        stored or updated row let in too: a row that exists is trained and served alike, whatever
        its count (after a crash rolled counters back, or admission was turned on later)."""
        out = by_count.copy()
        if not out.all():
            out[~out] = self.read_rows(keys[~out])[1]
        return out

    def _step_unique(self, ukeys: np.ndarray, g: np.ndarray, lr: float, check: Callable) -> list[np.ndarray | None]:
        """:meth:`step_rows` of distinct keys, under both locks."""
        if not len(ukeys):
            return []
        if self.device is not None:
            self.device.send_down(ukeys)
        slots = self.host.slots.lookup(ukeys)
        hit = slots >= 0
        miss = ~hit
        keep_t = keep_h = None
        if miss.any():  # the part that can fail (a read, or a writer that failed) goes first
            self.host.writer.check()
            rows, stored = self.host.stage_through(ukeys[miss], g[miss], lr)
            keep_t = check(ukeys[miss], rows.weights, rows.state)
        if hit.any():
            w, st, cnt = self.host.stage_slots(slots[hit], g[hit], lr)
            keep_h = check(ukeys[hit], w, st)
        if miss.any():
            self.host.commit_through(ukeys[miss], rows, stored, keep_t)
        if hit.any():
            self.host.commit_slots(slots[hit], w, st, cnt, keep_h)
        return [keep_t, keep_h]

    # ------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Send every update down: device tier -> host tier -> writer -> storage (written,
        not yet synced: the store flushes the storage). Rows stay resident, clean.

        Raises:
            WriteBackError: the storage refused the rows; they are still held in memory.
        """
        with self.lock, self.step_lock:
            self.host.writer.drain()  # first retry what an earlier failure holds
            if self.device is not None:
                self.device.flush()
            self.host.write_back_dirty()
            self.host.writer.drain()

    def delete(self, keys: np.ndarray, delete_below: Callable[[np.ndarray], int]) -> int:
        """Delete ``keys`` from every tier and, through ``delete_below``, from the storage, under
        the tier lock throughout, so the host manager cannot bring a row back in between.

        Returns:
            What ``delete_below`` returns (rows removed from the storage).
        Raises:
            RuntimeError: a row is pinned by a batch in flight.
        """
        with self.lock:
            self.flush()
            with self.step_lock:
                if self.device is not None:
                    self.device.send_down(keys)
                self.host.discard(keys)
            return delete_below(keys)

    def dirty_rows(self) -> int:
        """Rows holding updates the storage lacks (in any tier or the writer's queue)."""
        n = int(np.count_nonzero(self.host.dirty)) + self.host.writer.held
        if self.device is not None:
            n += int(self.device.dirty.sum())
        return n

    def stats(self) -> tuple[CacheStats, CacheStats | None]:
        """``(host tier stats, device tier stats or None)``."""
        return self.host.stats, (self.device.stats if self.device is not None else None)
