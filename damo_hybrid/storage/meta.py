"""The store's table registry on disk: ``meta.json``, the admission counters and the stored-key filters.

``meta.json`` holds each table's id, config, global step and row count, the format version
and whether the store uses RocksDB's TTL mode; ``admission/<id>.npy`` holds the counting
Bloom counters of tables with admission; ``keyfilter/<id>-<token>.npy`` each table's
:class:`~damo_hybrid.storage.keyfilter.StoredKeyFilter`, written only with a clean registry
(``live`` false) and trusted only when ``meta.json`` names its token. All are written
atomically (temp file, fsync, rename), only by the holder of the store's write lock.

Functions only; the store calls them under its lock.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TableConfig
from ..errors import ConfigConflictError, DamoHybridError, StoreLockedError
from ..rows.optimizers import state_width
from ..rows.table import Table
from .backend import Storage
from .files import atomic_file, make_dir, recover_dir, removed_on_failure
from .keyfilter import StoredKeyFilter, filter_path, remove_stale

__all__ = ["META", "META_FORMAT", "read_meta", "write_meta", "check_ttl", "check_compatible", "check_change",
           "config_changes", "load_tables", "recount_rows", "open_filters", "store_root"]

log = logging.getLogger(__name__)

META_FORMAT = 1
META = "meta.json"


def read_meta(root: Path) -> dict[str, Any] | None:
    """The parsed ``meta.json`` under ``root``, or None where there is none.

    Raises:
        DamoHybridError: unreadable, or of another format version.
    """
    p = root / META
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
    except OSError as e:  # the cause keeps its errno: the command line tells a refusal of the system
        raise DamoHybridError(f"store metadata {p} is unreadable: {e.strerror or e}") from e
    except ValueError as e:  # not JSON, or not text
        raise _damaged(p, f"not valid JSON ({str(e)[:80]})", "unreadable") from None
    if not isinstance(meta, dict):
        raise _damaged(p, "not a JSON object")
    if meta.get("format") != META_FORMAT:
        raise DamoHybridError(f"store metadata {p} has format {meta.get('format')!r}, this version reads {META_FORMAT}")
    _check_shape(meta, p)
    return meta


def _damaged(p: Path, why: str, state: str = "damaged") -> DamoHybridError:
    return DamoHybridError(f"store metadata {p} is {state}: {why}; restore it from a checkpoint")


def _check_shape(meta: dict[str, Any], p: Path) -> None:
    """Refuse a ``meta.json`` whose registry lacks a part the store reads (the configs are
    checked when they are read, :func:`load_tables`)."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    tables = meta.get("tables")
    if not isinstance(tables, dict):
        raise _damaged(p, "it holds no 'tables' object")
    if not whole(meta.get("next_table_id")):
        raise _damaged(p, f"'next_table_id' is {meta.get('next_table_id')!r}, not a count")
    for name, entry in tables.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict) or not all(
                whole(entry.get(k)) for k in ("id", "step", "rows")):
            raise _damaged(p, f"table {name[:40]!r} lacks its id, step, row count or config")


def check_ttl(meta: dict[str, Any], root: Path | None, ttl_seconds: int | None) -> None:
    """Raise ConfigConflictError where the store's TTL mode differs from the one asked for."""
    stored = bool(meta.get("ttl", False))
    if stored != (ttl_seconds is not None):
        want = "with" if stored else "without"
        raise ConfigConflictError(
            f"store {root} was created {want} a TTL; reopen it {want} StoreConfig.ttl_seconds "
            "(RocksDB's TTL mode changes the stored value format)"
        )


@contextmanager
def store_root(path: Path | None, read_only: bool, ttl_seconds: int | None) -> Iterator[Path | None]:
    """The folder of the store at ``path``, for the block that opens it (None: no folder, a
    storage handed in).

    - A swap killed between its two renames (a compat restore, a ``train --resume``) left the
      complete store aside (:func:`~damo_hybrid.storage.files.recover_dir`): it is put back, and
      a reader, which writes nothing, reads it where it is instead.
    - A reader needs a store there; a store of the other TTL mode is refused (:func:`check_ttl`).
    - If the block raises (a full disk, a read-only parent), the folders it created are removed,
      unless another handle holds the store (:class:`~damo_hybrid.errors.StoreLockedError`).
    """
    if path is None:
        yield None
        return
    root = recover_dir(path, repair=not read_only)
    if read_only and not (root / META).exists():
        raise FileNotFoundError(f"no store at {root} (missing {META})")
    pre = read_meta(root) if root.exists() else None
    if pre is not None:
        check_ttl(pre, root, ttl_seconds)
    with removed_on_failure(root, keep=(StoreLockedError,)):
        root.mkdir(parents=True, exist_ok=True)  # a reader's root exists: nothing made
        yield root


def check_compatible(stored: TableConfig, cfg: TableConfig) -> None:
    """Raise ConfigConflictError where ``cfg`` cannot reuse rows stored under ``stored``."""
    if stored.dim != cfg.dim:
        raise ConfigConflictError(
            f"table {cfg.name!r} is stored with dim={stored.dim}, opened with dim={cfg.dim}; "
            "use a new table name for a different dim"
        )
    sk, ck = stored.optimizer.kind, cfg.optimizer.kind
    if sk != ck:
        raise ConfigConflictError(
            f"table {cfg.name!r} is stored with optimizer {sk.value!r} "
            f"({state_width(sk, stored.dim)} state floats per row), opened with {ck.value!r} "
            f"({state_width(ck, cfg.dim)}); the stored optimizer state cannot be reused"
        )
    if stored.linear_column != cfg.linear_column:
        raise ConfigConflictError(
            f"table {cfg.name!r} is stored with linear_column={stored.linear_column}, opened with "
            f"{cfg.linear_column}: the meaning of its last column cannot change; use a new table name"
        )
    if stored.compression != cfg.compression:
        def name(c: Any) -> str:
            return "none" if c is None else c.describe()
        raise ConfigConflictError(
            f"table {cfg.name!r} is stored with compression {name(stored.compression)}, opened with "
            f"{name(cfg.compression)}: its rows are addressed by that mapping; use a new table name"
        )
    if (stored.row_dtype, stored.int16_step) != (cfg.row_dtype, cfg.int16_step):
        def fmt(c: TableConfig) -> str:
            return c.row_dtype.value + (f" (int16_step {c.int16_step:g})" if c.row_dtype.value == "int16" else "")
        raise ConfigConflictError(
            f"table {cfg.name!r} is stored with row_dtype {fmt(stored)}, opened with {fmt(cfg)}: its stored "
            "weights are in that format; use a new table name"
        )
    sa, ca = stored.admission, cfg.admission
    if sa is not None and ca is not None and (sa.capacity, sa.fpr) != (ca.capacity, ca.fpr):
        raise ConfigConflictError(
            f"table {cfg.name!r} has admission counters sized for capacity={sa.capacity}, fpr={sa.fpr}; "
            f"opened with capacity={ca.capacity}, fpr={ca.fpr}"
        )


def config_changes(stored: TableConfig, cfg: TableConfig) -> list[str]:
    """What ``cfg`` changes in ``stored``, one ``"field: old -> new"`` per leaf (dotted paths)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")

    walk(stored.to_dict(), cfg.to_dict(), "")
    return out


def check_change(stored: TableConfig, cfg: TableConfig, allow: bool) -> bool:
    """Whether opening a stored table with ``cfg`` changes its config, after checking that it may.

    A change that cannot reuse the stored rows (dim, optimizer kind, admission sizing) always
    raises. Any other change (learning rate and schedule, optimizer settings, the initializer of
    new rows, the NaN/Inf policy, admission threshold, expiry) raises too unless ``allow``, and
    is then logged field by field.

    Raises:
        ConfigConflictError: an incompatible change, or a change without ``allow``.
    """
    check_compatible(stored, cfg)
    changes = config_changes(stored, cfg)
    if not changes:
        return False
    if not allow:
        raise ConfigConflictError(
            f"table {cfg.name!r} is stored with another config ({'; '.join(changes)}): open it with the "
            "stored config, or pass StoreConfig(allow_config_change=True) (CLI: --allow-config-change) "
            "to apply the change"
        )
    log.warning("table %r: config changed (%s)", cfg.name, "; ".join(changes))
    return True


def _load_counters(root: Path | None, tid: int, cfg: TableConfig) -> np.ndarray | None:
    if cfg.admission is None or root is None:
        return None
    p = root / "admission" / f"{tid}.npy"
    if not p.exists():
        return None
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DamoHybridError(f"admission counters {p} are unreadable: {e}") from e


def load_tables(meta: dict[str, Any] | None, given: Iterable[TableConfig],
                root: Path | None, allow_change: bool = False) -> tuple[dict[str, Table], int, bool]:
    """Runtime tables from the stored registry and the configs the caller gives.

    A stored table keeps its id, step and row count; a given config that differs from its
    stored one replaces it only with ``allow_change`` (see :func:`check_change`). Given tables
    not stored yet get new ids.

    Raises:
        ConfigConflictError: see :func:`check_change`.

    Returns:
        ``(tables by name, next table id, whether meta.json needs rewriting)``.
    """
    tables: dict[str, Table] = {}
    next_id = 1
    todo = {t.name: t for t in given}
    changed = meta is None
    if meta is not None:
        next_id = int(meta["next_table_id"])
        for name, entry in meta["tables"].items():
            try:
                stored = TableConfig.from_dict(entry["config"])
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                where = root / META if root is not None else META
                raise _damaged(Path(where), f"table {name[:40]!r} has an unreadable config ({str(e)[:60]})") from None
            cfg = todo.pop(name, None)
            if cfg is None:
                cfg = stored
            else:
                changed |= check_change(stored, cfg, allow_change)
            tid = int(entry["id"])
            counters = _load_counters(root, tid, cfg)
            try:
                tables[name] = Table(tid, cfg, int(entry["step"]), int(entry["rows"]), counters)
            except ValueError as e:
                if counters is None or root is None:
                    raise
                raise DamoHybridError(f"admission counters {root / 'admission' / f'{tid}.npy'} are damaged: "
                                      f"{str(e)[:120]}; restore the store from a checkpoint") from None
    for cfg in todo.values():
        tables[cfg.name] = Table(next_id, cfg)
        next_id += 1
        changed = True
    return tables, next_id, changed


def write_meta(root: Path, tables: Iterable[Table], next_id: int, ttl: bool, live: bool = False,
               filters: dict[int, StoredKeyFilter] | None = None) -> None:
    """Write the admission counters (and, not ``live``, the stored-key filters), then
    ``meta.json``, atomically.

    ``live`` marks a store a writer holds open: rows written since the last write of this file
    are not in its counts nor in its filters, so a reader (or the next writer, after a crash)
    recounts them and rebuilds the filters."""
    tables = list(tables)
    token = None
    if filters and not live:  # taken after the rows they cover were written: a superset of them
        token = uuid.uuid4().hex[:12]
        make_dir(root / "keyfilter")  # its entry persisted before meta.json names the files in it
        for tid, kf in filters.items():
            kf.save(filter_path(root, tid, token))
    adm = root / "admission"
    for t in tables:
        if t.filter is not None:
            make_dir(adm)
            with atomic_file(adm / f"{t.id}.npy") as f:
                np.save(f, t.filter.counters, allow_pickle=False)
    meta = {
        "format": META_FORMAT,
        "ttl": ttl,
        "live": live,
        "next_table_id": next_id,
        "tables": {t.name: {"id": t.id, "config": t.cfg.to_dict(), "step": t.step, "rows": t.rows} for t in tables},
    }
    if token is not None:
        meta["key_filter"] = token
    with atomic_file(root / META) as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True).encode())
    for t in tables:  # a table whose admission was turned off drops its counters (after meta.json stops naming them)
        if t.filter is None:
            (adm / f"{t.id}.npy").unlink(missing_ok=True)
    if filters is not None:
        remove_stale(root, {filter_path(root, tid, token).name for tid in filters} if token else set())


def recount_rows(storage: Storage, tables: Iterable[Table], filters: dict[int, StoredKeyFilter] | None = None) -> None:
    """Set each table's row count from a scan of the storage (after an unclean shutdown),
    adding every key to the table's filter in ``filters`` if it has one."""
    filters = filters or {}
    for t in tables:
        kf = filters.get(t.id)
        t.rows = 0
        for k, _ in storage.scan(t.id):
            t.rows += len(k)
            if kf is not None:
                kf.add(k, t.rows)


def open_filters(storage: Storage, tables: Iterable[Table], meta: dict[str, Any] | None, root: Path | None,
                 max_bytes: int, read_only: bool, trust_saved: bool = True) -> dict[int, StoredKeyFilter]:
    """Bring the registry up to date with the storage at open: the row counts after an unclean
    shutdown, and each table's stored-key filter (see :mod:`~damo_hybrid.storage.keyfilter`).

    A filter saved with a clean registry is loaded; any other (a crash, a store or checkpoint
    written before filters, a storage handed in) is rebuilt from a scan of the table's keys. A
    reader (``read_only``) does without the filters it cannot load rather than scan, and
    ``max_bytes`` 0 turns them off. ``trust_saved`` False (a storage handed in, whose rows the
    saved files may not describe) always rebuilds.

    Returns:
        table id -> its filter.
    """
    tables = list(tables)
    live = meta is not None and bool(meta.get("live"))
    token = meta.get("key_filter") if meta is not None and not live and trust_saved else None
    filters: dict[int, StoredKeyFilter] = {}
    rebuild: list[Table] = []
    for t in tables:
        if max_bytes <= 0:
            break
        kf = StoredKeyFilter.load(filter_path(root, t.id, token), max_bytes) if root and token else None
        if kf is None and not (read_only and not live):
            kf = StoredKeyFilter(max_bytes)
            rebuild.append(t)
        if kf is not None:
            filters[t.id] = kf
    if live:  # not closed cleanly (a crash), or open elsewhere now
        log.warning("store %s was not closed cleanly (or is open elsewhere): recounting its rows", root)
        recount_rows(storage, tables, filters)
    elif rebuild:  # a new store (nothing to scan), or one saved without its filters
        recount_rows(storage, rebuild, filters)
        if any(t.rows for t in rebuild):
            log.info("built the stored-key filters of tables %s from a scan of their keys", [t.name for t in rebuild])
    return filters
