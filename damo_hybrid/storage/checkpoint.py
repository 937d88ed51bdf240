"""Atomic store checkpoints and restores.

A checkpoint is a directory holding a RocksDB checkpoint (``db/``, hard links of immutable
files), the registry (``meta.json``, admission counters) and a ``CHECKPOINT.json`` marker
written last with a manifest of every other file but the key filters, which are rebuilt where
missing (sizes, and the SHA-256 of files up to 1 MiB).
It is built in a hidden sibling directory and renamed into place, so an interrupted checkpoint
leaves nothing at its path; a directory without the marker is never restored, and one whose files
differ from its manifest is refused (:func:`verify_store_checkpoint`).

Functions only; the store calls :func:`write_checkpoint` under its lock, after flushing
every cache tier.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import DamagedOutputError, DamoHybridError
from .backend import Storage
from .files import atomic_file, check_files, fsync_dir, fsync_tree, list_files
from .meta import META, META_FORMAT

__all__ = ["MARKER", "write_checkpoint", "copy_checkpoint", "restore_checkpoint", "verify_store_checkpoint"]

MARKER = "CHECKPOINT.json"
_HASHED_BYTES = 1 << 20  # larger files (RocksDB's tables, with block checksums of their own) by size alone
_DERIVED = ("keyfilter/",)  # trusted only when meta.json names their token, else rebuilt from a scan


def write_checkpoint(storage: Storage, dst: Path, write_registry: Callable[[Path], None], tables: list[str]) -> Path:
    """Write a complete checkpoint at ``dst`` (which must not exist) or nothing.

    Args:
        storage: the flushed storage.
        dst: the checkpoint directory.
        write_registry: writes ``meta.json`` and the admission counters into a directory.
        tables: table names, recorded in the marker.
    """
    if dst.exists():
        raise FileExistsError(f"checkpoint path {dst} already exists; choose a new directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        storage.checkpoint(str(tmp / "db"))
        write_registry(tmp)
        files = {rel: f for rel, f in list_files(tmp, hash_max_bytes=_HASHED_BYTES).items()
                 if not rel.startswith(_DERIVED)}  # a missing or stale key filter is rebuilt by design
        marker = {"format": META_FORMAT, "created": time.time(), "tables": sorted(tables),
                  "manifest": {"files": files}}  # of all but itself
        with atomic_file(tmp / MARKER) as f:
            f.write(json.dumps(marker).encode())
        fsync_tree(tmp / "db")
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a complete checkpoint to a new store directory ``dst`` (absent or empty); the
    copy appears by one rename, and the checkpoint itself is never modified.

    Raises:
        DamoHybridError: ``src`` is incomplete (no marker) or not a checkpoint.
        FileExistsError: ``dst`` exists and is not empty.
    """
    if not (src / MARKER).is_file():
        raise DamoHybridError(
            f"{src} is not a complete checkpoint (no {MARKER}); an interrupted checkpoint is never used"
        )
    if not (src / META).is_file():
        raise DamoHybridError(f"checkpoint {src} has no {META} (the table registry): it was damaged after it "
                              "was written; restore an older checkpoint")
    verify_store_checkpoint(src)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"restore target {dst} is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.restore-{uuid.uuid4().hex}"
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MARKER))
        dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_store_checkpoint(src: Path) -> None:
    """Check that checkpoint ``src`` holds the files its marker's manifest lists, of their sizes (and
    SHA-256 where recorded); a marker of an earlier version, without a manifest, passes.

    Raises:
        DamagedOutputError: the marker is unreadable, or a file is missing, cut short or replaced.
    """
    try:
        marker = json.loads((src / MARKER).read_text())
        files = marker.get("manifest", {}).get("files", {}) if isinstance(marker, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError("its manifest is not a listing of files")
    except (OSError, ValueError, AttributeError) as e:
        raise DamagedOutputError(f"{src / MARKER} is damaged ({str(e)[:80]}): restore an older checkpoint") from None
    check_files(src, files, "store checkpoint", "restore an older checkpoint", listed_in=MARKER)


T = TypeVar("T")


def restore_checkpoint(src: Path, dst: Path, open_store: Callable[[], T]) -> T:
    """:func:`copy_checkpoint` then ``open_store()``; if either fails, the target is left as it
    was found (absent or empty), so a retry works."""
    existed = dst.exists()
    copy_checkpoint(src, dst)
    try:
        return open_store()
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        if existed:
            dst.mkdir(parents=True, exist_ok=True)
        raise
