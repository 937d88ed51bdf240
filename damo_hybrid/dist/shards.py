"""A sharded run's stores read as one store: export, dump and inspect give one output for the run.

Under torchrun, ``train --store runs/s`` gives rank ``R`` of ``W`` the store
``runs/s/rank-RRRRR-of-WWWWW``. :func:`shard_dirs` finds them, and :class:`ShardedStoreView` opens
every one read-only and answers what a read-only :class:`~damo_hybrid.store.EmbeddingStore` answers
for export and inspection. The shards hold disjoint keys (each key has one owner), so the view's
rows are the union of theirs; its exports sort each table by key, as one store's are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DamoHybridError
from ..rows.codec import Rows
from ..storage.files import atomic_file, scratch_dir
from ..store import EmbeddingStore, StoreStats

__all__ = ["shard_dirs", "ShardedStoreView", "open_for_reading"]

_RANK_DIR = re.compile(r"^rank-(\d{5})-of-(\d{5})$")


def shard_dirs(root: str | os.PathLike[str]) -> list[Path] | None:
    """The rank stores of a sharded run's store directory, in rank order; None when ``root`` is
    not one (a store of its own, or no rank directories).

    Raises:
        DamoHybridError: it holds stores of runs on several world sizes, or lacks a rank's.
    """
    root = Path(root)
    if not root.is_dir() or (root / "meta.json").exists():
        return None
    found: dict[int, dict[int, Path]] = {}
    for p in root.iterdir():
        m = _RANK_DIR.match(p.name)
        if m and p.is_dir():
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        return None
    if len(found) > 1:
        raise DamoHybridError(f"{root} holds the stores of runs on {sorted(found)} ranks; move the older run's "
                              "rank-* directories away to read the other")
    (world, ranks), = found.items()
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise DamoHybridError(f"{root} lacks the stores of ranks {missing} of {world}: copy them there to read the run")
    return [ranks[r] for r in range(world)]


class ShardedStoreView:
    """Every rank's store of a sharded run, read-only, as one store (see the module doc).

    Args:
        dirs: the rank stores, from :func:`shard_dirs`.
    """

    def __init__(self, dirs: list[Path]) -> None:
        self.stores: list[EmbeddingStore] = []
        try:
            for d in dirs:
                self.stores.append(EmbeddingStore(d, read_only=True))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ShardedStoreView:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for s in self.stores:
            s.close()

    @property
    def tables(self) -> dict[str, Any]:
        return self.stores[0].tables

    def step(self, table: str) -> int:
        """The table's global step (every rank counts every step)."""
        return self.stores[0].step(table)

    def scan(self, table: str, batch: int = 65536) -> Iterator[tuple[np.ndarray, Rows]]:
        """``(keys uint64 (B,), rows)`` of every shard in turn."""
        for s in self.stores:
            yield from s.scan(table, batch)

    def stats(self) -> StoreStats:
        """Rows and disk bytes summed over the shards (the other counters are zero: nothing is read
        or written through a view)."""
        per = [s.stats() for s in self.stores]
        rows = {n: sum(p.table_rows.get(n, 0) for p in per) for n in self.tables}
        return StoreStats(sum(rows.values()), sum(p.disk_bytes for p in per), 0, 0, 0, 0, 0, rows)

    def export(self, path: str | os.PathLike[str], tables: Iterable[str] | None = None) -> dict[str, int]:
        """:meth:`EmbeddingStore.export` of the whole run into one ``.npz``."""
        return self.dump(path, tables=tables)

    def dump(self, path: str | os.PathLike[str], tables: Iterable[str] | None = None, min_count: int = 0,
             expire_days: float | None = None) -> dict[str, int]:
        """:meth:`EmbeddingStore.dump` of the whole run into one ``.npz``: each shard's arrays,
        joined and sorted by key per table (written atomically).

        Returns:
            Rows written per table.
        """
        names = None if tables is None else list(tables)
        parts: list[dict[str, np.ndarray]] = []
        with scratch_dir(path) as d:  # beside the output: its file system, removed after a kill by the next dump
            for i, s in enumerate(self.stores):
                p = Path(d) / f"{i}.npz"
                s.dump(p, tables=names, min_count=min_count, expire_days=expire_days)
                with np.load(p) as z:
                    parts.append({k: z[k] for k in z.files})
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        written: dict[str, int] = {}
        for name in [k[len("keys_"):] for k in arrays if k.startswith("keys_")]:
            order = np.argsort(arrays[f"keys_{name}"], kind="stable")
            for k in [k for k in arrays if k.endswith(f"_{name}") and k.split("_", 1)[1] == name]:
                arrays[k] = arrays[k][order]
            written[name] = len(order)
        with atomic_file(path) as f:
            np.savez(f, **arrays)
        return written


def open_for_reading(path: str | os.PathLike[str]) -> EmbeddingStore | ShardedStoreView:
    """A store directory read-only: a store, or every rank's store of a sharded run as one."""
    dirs = shard_dirs(path)
    return EmbeddingStore(path, read_only=True) if dirs is None else ShardedStoreView(dirs)
