"""Atomic save and restore of the whole training state.

A training checkpoint is a directory::

    store/           an EmbeddingStore checkpoint (rows, step counters, admission counts, configs)
    trainer.pt       dense model and dense optimizer state, step, samples, RNG states
    TRAINING.json    marker, written last: the step and a manifest of every other file (its
                     size; the SHA-256 of the small ones and of ``trainer.pt``)

built in a hidden sibling directory and renamed into place, so a crash (even ``kill -9``)
leaves either the previous checkpoints or a new complete one; a directory without the
marker is never picked up, and one whose files do not match its manifest (a file truncated,
replaced or missing after it was written, a part of another checkpoint) is refused by
:func:`verify_checkpoint`. Checkpoints are named ``step-<N>`` under a root directory, and
the newest complete one is found by :func:`latest_checkpoint`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DamagedOutputError, DamoHybridError
from ..storage.files import atomic_file, check_files, fsync_dir, list_files

__all__ = ["save_training_checkpoint", "complete_checkpoints", "latest_checkpoint", "load_latest",
           "load_trainer_state", "prune_checkpoints", "step_dirs", "manifest", "verify_checkpoint", "read_marker",
           "check_model_class"]

_MARKER = "TRAINING.json"
_NAME = re.compile(r"^step-(\d+)$")
#: files up to this size are hashed in a manifest (``trainer.pt`` always); larger ones (RocksDB's
#: tables, which carry block checksums of their own) are checked by size
_HASHED_BYTES = 1 << 20
_FIX = "resume falls back to an older checkpoint"


def manifest(ck: str | os.PathLike[str], markers: tuple[str, ...] = ()) -> dict[str, Any]:
    """What :func:`verify_checkpoint` checks: every file under ``ck`` but the ``markers`` and the
    stores' key filters, with its size, and the SHA-256 of ``trainer.pt`` and of every file of at
    most 1 MiB
    (:func:`~damo_hybrid.storage.files.list_files`).

    Returns:
        ``{"files": {relative path: {"bytes": n[, "sha256": hex]}}}``.
    """
    files = list_files(Path(ck), skip=markers, hash_max_bytes=_HASHED_BYTES, hash_names=("trainer.pt",))
    # a store's key filters are rebuilt where missing or stale (trusted only by meta.json's token)
    return {"files": {rel: f for rel, f in files.items() if "keyfilter" not in rel.split("/")[:-1]}}


def verify_checkpoint(ck: str | os.PathLike[str], marker: dict[str, Any], marker_name: str = _MARKER) -> None:
    """Check that the files of checkpoint ``ck`` are those its marker's manifest lists, of the
    sizes and contents it records. A marker without a manifest (written before manifests
    existed) passes.

    Raises:
        DamagedOutputError: a file is missing, of another size or content; the message names it.
    """
    m = marker.get("manifest")
    if m is None:
        return
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise DamagedOutputError(f"{Path(ck) / marker_name} is damaged: its manifest is not a listing of files")
    check_files(Path(ck), files, "checkpoint", _FIX, listed_in=marker_name)


def read_marker(ck: str | os.PathLike[str], name: str = "TRAINING.json") -> dict[str, Any]:
    """The parsed marker file ``name`` of checkpoint ``ck``.

    Raises:
        DamoHybridError: missing, not JSON or not a JSON object (damage); the message names the file.
        OSError: the system refused the read (permission, I/O error): not damage, raised as is.
    """
    p = Path(ck) / name
    try:
        m = json.loads(p.read_text())
    except (FileNotFoundError, ValueError) as e:
        raise DamoHybridError(f"checkpoint marker {p} is unreadable: {str(e)[:120]}") from None
    if not isinstance(m, dict):
        raise DamoHybridError(f"checkpoint marker {p} is damaged: not a JSON object")
    return m


def save_training_checkpoint(root: str | os.PathLike[str], step: int, store: Any, trainer_state: dict[str, Any]) -> Path:
    """Write ``root/step-<step>`` atomically.

    Args:
        root: checkpoint root (created if missing).
        step: the number of completed training steps.
        store: the :class:`~damo_hybrid.store.EmbeddingStore` (its caches already flushed).
        trainer_state: picklable dict (tensors allowed) saved with ``torch.save``.
    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f"step-{step}"
    if dst.exists():
        raise FileExistsError(f"checkpoint {dst} already exists")
    tmp = root / f".step-{step}.partial-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        store.checkpoint(tmp / "store")
        with atomic_file(tmp / "trainer.pt") as f:
            torch.save(trainer_state, f)
        marker = {"step": step, "created": time.time(), "manifest": manifest(tmp)}  # of all the rest
        with atomic_file(tmp / _MARKER) as f:  # last
            f.write(json.dumps(marker).encode())
        os.rename(tmp, dst)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def step_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """The ``step-N`` directories under ``root``, complete or not, of either kind (one process's or
    a sharded run's), oldest (lowest step) first; not one set aside as ``step-N.damaged-<id>``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def complete_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints under ``root``, newest (highest step) first."""
    return [p for p in reversed(step_dirs(root)) if (p / _MARKER).is_file() and (p / "trainer.pt").is_file()]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    done = complete_checkpoints(root)
    return done[0] if done else None


def _numpy_globals() -> list[Any]:
    """What numpy's RNG state (a uint32 array in a tuple) needs to unpickle: nothing more."""
    core = getattr(np, "_core", None) or np.core  # numpy 2, numpy 1
    out: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [dtypes.UInt32DType]
    return out


def load_trainer_state(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``trainer_state`` saved in a checkpoint.

    Loaded with ``weights_only=True``: tensors, containers, numbers and numpy's RNG state only,
    so a ``trainer.pt`` planted in a checkpoint directory cannot run code.

    Raises:
        DamoHybridError: the file is damaged (truncated, say) or holds other objects.
    """
    path = Path(ckpt) / "trainer.pt"
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamoHybridError(f"{path} is damaged or holds objects a training checkpoint never holds; "
                              f"not loaded ({first})") from None
    except (MemoryError, OSError) as e:  # the system's refusal, not damage: never a reason to set it aside
        if isinstance(e, FileNotFoundError):
            raise DamoHybridError(f"{path} is missing: the checkpoint is incomplete") from None
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways (IndexError, KeyError ...)
        raise DamoHybridError(f"{path} is damaged (truncated or unreadable): {e}") from None


def load_latest(root: str | os.PathLike[str], log: Any = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint that matches its manifest and whose trainer state loads,
    and that state.

    A damaged newer one is renamed ``step-<N>.damaged`` (kept for inspection, out of the way of
    the run that redoes its steps) and reported through ``log``, a ``str -> None`` callable.
    """
    for ck in complete_checkpoints(root):
        try:
            verify_checkpoint(ck, read_marker(ck))
            return ck, load_trainer_state(ck)
        except DamoHybridError as e:
            aside = ck.with_name(f"{ck.name}.damaged-{uuid.uuid4().hex[:8]}")
            os.rename(ck, aside)
            if log is not None:
                log(f"skipping checkpoint {ck}: {e}; moved it to {aside.name} and falling back to an older one")
    return None


def prune_checkpoints(root: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and leftover partial ones."""
    root = Path(root)
    done = [p for p in step_dirs(root) if (p / _MARKER).is_file()]
    for p in done[:-keep] if keep > 0 else done:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(".step-") and ".partial-" in p.name:
            shutil.rmtree(p, ignore_errors=True)


def check_model_class(state: dict[str, Any], model_class: str, dense_mode: str = "raw",
                      field_tables: dict[str, str] | None = None) -> None:
    """Raise ValueError where a saved trainer state comes from another model class (or the same
    class with its dense features embedded another way, or its fields reading other tables)."""
    saved = state.get("model_class")
    if saved is not None and saved != model_class:
        raise ValueError(f"the checkpoint was written by a {saved} model and this run builds a {model_class}: "
                         f"resume with the model that wrote it, or train the {model_class} in a new store")
    mode = (state.get("model_spec") or {}).get("dense_mode", "raw")
    if saved is not None and mode != dense_mode:
        raise ValueError(f"the checkpoint's {saved} takes its dense features as --dense-mode {mode}, this run as "
                         f"{dense_mode}: resume with --dense-mode {mode}, or train in a new store")
    tables = (state.get("model_spec") or {}).get("field_tables") or {}
    if saved is not None and tables != (field_tables or {}):
        raise ValueError(f"the checkpoint's fields read tables {tables or 'emb only'}, this run's "
                         f"{field_tables or 'emb only'}: resume with the same [fields] options, or train in a new store")
