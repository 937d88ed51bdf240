"""The store's registry of cache tiers: at most one :class:`TableTiers` per table.

The store creates it and calls it under the store's lock. It sizes new tiers from a budget,
hands out the existing tiers of a table to every later caller (the first creation wins), and
flushes, discards and reports over all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from ..config import StoreConfig
from ..errors import ConfigConflictError
from ..rows.table import Table
from ..storage.rowio import RowIO
from .host import CacheStats, HostCache
from .tiers import TableTiers

__all__ = ["TierRegistry", "DEFAULT_DEVICE_CACHE_MB"]

log = logging.getLogger(__name__)

DEFAULT_DEVICE_CACHE_MB = 2048.0  # device-tier budget on a GPU when none is given


def _check_host_memory(tables: list[Table], rows: list[int], fix: str, floor: int | None = None) -> None:
    """Refuse host tiers of ``rows`` rows per table that the machine's free memory cannot hold
    (their slabs are reserved lazily: an overcommitted one would meet the OOM killer later)."""
    from ..resources import check_fits

    need = sum(r * HostCache.nbytes_per_row(t.dim, t.width, t.prec.itemsize) for t, r in zip(tables, rows))
    at_floor = floor is not None and any(r == floor for r in rows)
    names = ", ".join(t.name for t in tables[:4]) + (", ..." if len(tables) > 4 else "")
    check_fits([(f"{sum(rows):,} rows" + (f", at least {floor:,} per table" if at_floor else ""), need)],
               fix + (" or min_cache_rows" if at_floor else ""), f"caching table{'s' if len(tables) > 1 else ''} {names}")


class TierRegistry:
    """Cache tiers by table name.

    Args:
        io: the store's row I/O.
        config: the store's config (default budgets, ``min_cache_rows``).
    """

    def __init__(self, io: RowIO, config: StoreConfig) -> None:
        self._io, self._config = io, config
        self._tiers: dict[str, TableTiers] = {}

    def get(self, name: str) -> TableTiers | None:
        return self._tiers.get(name)

    def cache(self, tables: list[Table], cache_mb: float | None, device_cache_mb: float | None,
              device: Any, min_cache_rows: int | None = None) -> dict[str, TableTiers]:
        """See :meth:`EmbeddingStore.cache <damo_hybrid.store.EmbeddingStore.cache>`."""
        cfg = self._config
        if isinstance(device, str):
            import torch

            device = torch.device(device)
        host_mb = cfg.cache_mb if cache_mb is None else cache_mb
        dev_mb = cfg.device_cache_mb if device_cache_mb is None else device_cache_mb
        if device is not None and dev_mb is None and getattr(device, "type", None) == "cuda":
            dev_mb = DEFAULT_DEVICE_CACHE_MB
        if not host_mb > 0 or (dev_mb is not None and not dev_mb > 0):
            raise ValueError(f"cache budgets must be > 0, got cache_mb={host_mb}, device_cache_mb={dev_mb}")
        if dev_mb is None:
            device = None
        elif device is None:
            device = "cpu"
        new = [t for t in tables if t.name not in self._tiers]
        # every check before any tier exists: a failed call caches nothing
        for t in tables:
            if t not in new:
                self._check_same_device(self._tiers[t.name], device)
        if new:
            share = host_mb * 2**20 / sum(HostCache.nbytes_per_row(t.dim, t.width, t.prec.itemsize) for t in new)
            dshare = None
            if dev_mb is not None:
                from .device import (
                    DeviceCache,  # torch is imported only where a device tier exists
                )

                dshare = dev_mb * 2**20 / sum(DeviceCache.nbytes_per_row(t.dim, t.width, t.prec.itemsize) for t in new)
            floor = cfg.min_cache_rows if min_cache_rows is None else min_cache_rows
            _check_host_memory(new, [max(floor, int(share)) for t in new],
                               f"lower the cache budget (cache_mb={host_mb:,.0f}; CLI: --cache-mb)", floor)
            try:
                for t in new:
                    self.cache_table(t, max(floor, int(share)), max(floor, int(dshare)) if dshare is not None else None,
                                     device)
            except BaseException:  # a tier that cannot be made (memory): the call caches nothing
                for t in new:
                    self._tiers.pop(t.name, None)
                raise
        for t in tables:
            if t not in new:
                if cache_mb is not None or device_cache_mb is not None:
                    log.warning("table %r is cached already (%d host rows): the budget asked for now is ignored",
                                t.name, self._tiers[t.name].host.capacity)
        return {t.name: self._tiers[t.name] for t in tables}

    def cache_table(self, t: Table, rows: int, device_rows: int | None, device: Any) -> TableTiers:
        """See :meth:`EmbeddingStore.cache_table <damo_hybrid.store.EmbeddingStore.cache_table>`."""
        if device_rows is None:
            device = None
        elif device is None:
            device = "cpu"
        tiers = self._tiers.get(t.name)
        if tiers is None:
            _check_host_memory([t], [rows], "ask for fewer rows")
            tiers = TableTiers(self._io.bind(t), rows, device_rows, device)
            self._tiers[t.name] = tiers
        else:
            self._check_same_device(tiers, device)
        return tiers

    @staticmethod
    def _check_same_device(tiers: TableTiers, device: Any) -> None:
        have = tiers.device_type
        if device is not None and have is not None:
            import torch

            want = torch.device(device)
            same = want.type == have.type and (want.index is None or want.index == have.index)
        else:
            same = device is None and have is None
        if not same:
            raise ConfigConflictError(
                f"table {tiers.name!r} is cached already with device tier {have}, asked for {device}; "
                "every collection over a table must use the same backend and device cache"
            )

    def flush(self, names: Iterable[str] | None = None) -> None:
        """Flush the tiers of ``names`` (default all); see :meth:`TableTiers.flush`."""
        for n in list(self._tiers) if names is None else names:
            tiers = self._tiers.get(n)
            if tiers is not None:
                tiers.flush()

    def lock(self, name: str) -> AbstractContextManager[Any]:
        """The table's tier lock (a no-op for a table without tiers)."""
        tiers = self._tiers.get(name)
        return tiers.lock if tiers is not None else nullcontext()

    def delete(self, name: str, keys: np.ndarray, delete_below: Callable[[np.ndarray], int]) -> int:
        """Delete ``keys`` of one table from its tiers and the storage; see :meth:`TableTiers.delete`."""
        tiers = self._tiers.get(name)
        return tiers.delete(keys, delete_below) if tiers is not None else delete_below(keys)

    def stats(self) -> dict[str, tuple[CacheStats, CacheStats | None]]:
        return {n: tr.stats() for n, tr in self._tiers.items()}

    def seal(self) -> None:
        """Mark every tier closed under its locks (at close, once flushed, before the registry and
        the key filters are saved): a batch still being prepared or committed in another thread
        then fails loudly instead of changing rows after the last save."""
        for tiers in self._tiers.values():
            with tiers.lock, tiers.step_lock:
                tiers.closed = True

    def clear(self) -> None:
        """Close and forget every tier (after a successful flush, at close): a collection that
        still holds one gets StoreClosedError instead of training rows nobody will write."""
        for tiers in self._tiers.values():
            tiers.closed = True
        self._tiers.clear()
