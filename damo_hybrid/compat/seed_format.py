"""The seed project's binary dump formats.

Layout ``"1.0"`` (``PyStorage.dump``; little-endian)::

    int32[256]   dim of each group (0 for an unused group)
    uint64[256]  number of rows of each group
    then per row: uint64 key, int32 group, float32[dim of that group]

Layout ``"1.2"`` (``Damo.dump``, what the seed's 1.2 inference export reads)::

    int32        n, the number of groups dumped
    int32[n]     their group numbers; int32[n] their dims; int64[n] their row counts
    then per row: int64 key, int32 group, float32[dim of that group]

Rows of one group are contiguous. A table named ``group_<g>`` is written as
group ``g``; other tables take the lowest free group numbers in name order.
Keys are written with all 64 bits (the seed masked its top 8 bits with the
group). Rows are streamed to disk chunk by chunk, and the file appears only
when complete (temp file + rename).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..storage.files import atomic_file
from ..storage.maintenance import dump_window, stale_mask
from ..store import EmbeddingStore

__all__ = ["dump_seed_format", "read_seed_format", "group_of_tables"]

GROUPS = 256
_GROUP_NAME = re.compile(r"^group_(\d+)$")


def group_of_tables(names: Iterable[str]) -> dict[str, int]:
    """Assign a group number to each table name (see module docstring)."""
    names = sorted(names)
    out: dict[str, int] = {}
    for n in names:
        m = _GROUP_NAME.match(n)
        if m and int(m.group(1)) < GROUPS:
            out[n] = int(m.group(1))
    free = (g for g in range(GROUPS) if g not in set(out.values()))
    for n in names:
        if n not in out:
            g = next(free, None)
            if g is None:
                raise ValueError(f"the seed format holds at most {GROUPS} groups; dump fewer tables")
            out[n] = g
    return out


def dump_seed_format(
    store: EmbeddingStore,
    path: str | os.PathLike[str],
    tables: Iterable[str] | None = None,
    min_count: int = 0,
    expire_days: float | None = None,
    now: float | None = None,
    layout: str = "1.0",
) -> dict[str, int]:
    """Write tables in one of the seed's binary formats.

    Args:
        store: an open store.
        path: output file.
        tables: which tables (default: all).
        min_count: keep rows with at least this many updates.
        expire_days: keep rows updated within this many days.
        now: current unix time (default ``time.time()``).
        layout: ``"1.0"`` or ``"1.2"`` (see the module doc).
    Returns:
        Rows written per table.
    """
    if layout not in ("1.0", "1.2"):
        raise ValueError(f"layout must be '1.0' or '1.2', got {layout!r}")
    names = list(store.tables) if tables is None else list(tables)
    comp = [n for n in names if n in store.tables and store.tables[n].compression is not None]
    if comp:
        raise ValueError(f"the seed's format has one row per id; tables {comp} store compressed rows (one per "
                         "partition key) that it cannot represent: leave them out (--table) or use export")
    groups = group_of_tables(names)
    now, age = dump_window(min_count, expire_days, now)
    dims = np.zeros(GROUPS, "<i4")
    counts = np.zeros(GROUPS, "<u8")
    written: dict[str, int] = {}
    used = sorted(groups[n] for n in names)
    with atomic_file(path) as f:
        f.write(bytes(GROUPS * 12 if layout == "1.0" else 4 + 16 * len(used)))  # header, patched below
        for name in sorted(names, key=lambda n: groups[n]):
            g, dim = groups[name], store.tables[name].dim
            rec = np.dtype([("key", "<u8"), ("group", "<i4"), ("w", "<f4", (dim,))])
            dims[g] = dim
            n = 0
            for keys, rows in store.scan(name):
                keep = ~stale_mask(rows, now, age, min_count)
                buf = np.empty(int(keep.sum()), rec)
                buf["key"], buf["group"], buf["w"] = keys[keep], g, rows.weights[keep]
                f.write(buf.tobytes())
                n += len(buf)
            counts[g] = n
            written[name] = n
        f.seek(0)
        if layout == "1.0":
            f.write(dims.tobytes() + counts.tobytes())
        else:
            f.write(np.array([len(used)] + used + [int(dims[g]) for g in used], "<i4").tobytes()
                    + counts[used].astype("<i8").tobytes())
    return written


def read_seed_format(path: str | os.PathLike[str]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Read a seed-format dump: ``{group: (keys uint64 (M,), weights float32 (M, dim))}``."""
    data = Path(path).read_bytes()
    if len(data) < GROUPS * 12:
        raise ValueError(f"{path} is too short for the seed dump header ({len(data)} bytes)")
    dims = np.frombuffer(data, "<i4", GROUPS)
    counts = np.frombuffer(data, "<u8", GROUPS, offset=GROUPS * 4)
    off = GROUPS * 12
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for g in np.nonzero(counts)[0]:
        dim, n = int(dims[g]), int(counts[g])
        rec = np.dtype([("key", "<u8"), ("group", "<i4"), ("w", "<f4", (dim,))])
        if off + n * rec.itemsize > len(data):
            raise ValueError(f"{path} is truncated in group {g}")
        arr = np.frombuffer(data, rec, n, offset=off)
        if (arr["group"] != g).any():
            raise ValueError(f"{path}: rows of group {g} carry another group number")
        out[int(g)] = (arr["key"].copy(), arr["w"].copy())
        off += n * rec.itemsize
    if off != len(data):
        raise ValueError(f"{path} has {len(data) - off} trailing bytes")
    return out
