"""Sharded checkpoints: every rank's shard plus the trainer state written once, complete only
when all of them are, and restorable onto any number of ranks.

Layout of ``root/step-NNNNNNNNN/``:

- ``shard-RRRRR-of-WWWWW/``: rank ``R``'s store checkpoint (rows, metadata, admission counters);
- ``trainer.pt``: the dense model, optimizer and data position (rank 0 writes it);
- ``COMPLETE.json``: ``{"world", "sharding_version", "step", "manifest"}``, written by rank 0
  only after every rank's part is complete (a barrier), so a checkpoint any rank left incomplete
  is never used; its manifest (:func:`~damo_hybrid.pipeline.checkpoint.manifest`) lets a reader
  refuse a part damaged or replaced afterwards.

Restore (:func:`restore_shard`) onto ``W'`` ranks: with ``W' == W`` each rank copies its own
shard (exact, admission counters included); with another ``W'`` each new rank reads every old
shard and keeps the rows :func:`~damo_hybrid.dist.sharding.shard_of` gives it, with each table's
global step. Admission counters cannot be split by key: a re-shard starts them anew (logged).

One root may hold checkpoints of both kinds: a run resumed on another number of processes, one
process included, writes its own kind beside the other's. :func:`newest_checkpoint` picks the
newest complete one of either kind, and :func:`restore_shard` restores either kind (a one-process
checkpoint is a sharded one of one rank).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import StoreConfig
from ..errors import DamoHybridError
from ..pipeline.checkpoint import (
    complete_checkpoints,
    load_trainer_state,
    manifest,
    read_marker,
    step_dirs,
    verify_checkpoint,
)
from ..storage.files import atomic_file
from ..store import EmbeddingStore
from .exchange import lost_rank_as_error
from .sharding import SHARDING_VERSION, claim_shard, shard_of

__all__ = ["save_sharded_checkpoint", "latest_sharded_checkpoint", "prune_sharded_checkpoints", "restore_shard",
           "newest_checkpoint", "any_checkpoint", "is_sharded", "COMPLETE", "candidates", "set_aside", "set_aside_ones"]

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"


def _shard_dir(ck: Path, rank: int, world: int) -> Path:
    return ck / f"shard-{rank:05d}-of-{world:05d}"


def save_sharded_checkpoint(root: str | Path, step: int, store: EmbeddingStore, state: dict[str, Any] | None,
                            group: Any = None) -> Path:
    """Every rank calls it at the same step: its shard, then (rank 0) the trainer state and the marker.

    Returns:
        The checkpoint directory.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ck = Path(root) / f"step-{step:09d}"
    if (ck / COMPLETE).is_file():  # one a resume passed over as damaged (the ranks do not move it then)
        with lost_rank_as_error("checkpoint's barrier"):
            dist.barrier(group)  # every rank has seen it before rank 0 sets it aside
        if rank == 0:
            aside = ck.with_name(f"{ck.name}.damaged-{uuid.uuid4().hex[:8]}")
            os.rename(ck, aside)
            log.warning("checkpoint %s was passed over by the resume; moved it to %s and writing it anew", ck, aside.name)
        with lost_rank_as_error("checkpoint's barrier"):
            dist.barrier(group)
    ck.mkdir(parents=True, exist_ok=True)
    # what an earlier attempt at this step left before a rank stopped (the run resumed from an
    # older checkpoint and came back here): never complete, so never used; written anew
    mine = _shard_dir(ck, rank, world)
    shutil.rmtree(mine, ignore_errors=True)
    if rank == 0:  # shards of another number of ranks: no rank of this run writes them
        for p in ck.glob("shard-*-of-*"):
            if not p.name.endswith(f"-of-{world:05d}"):
                shutil.rmtree(p, ignore_errors=True)
    store.checkpoint(mine)
    if rank == 0 and state is not None:
        with atomic_file(ck / "trainer.pt") as f:
            torch.save(state, f)
    with lost_rank_as_error("checkpoint's barrier"):
        dist.barrier(group)  # every rank's shard is complete
    if rank == 0:
        marker = {"world": world, "sharding_version": SHARDING_VERSION, "step": step, "manifest": manifest(ck)}
        with atomic_file(ck / COMPLETE) as f:  # last
            f.write(json.dumps(marker).encode())
    with lost_rank_as_error("checkpoint's barrier"):
        dist.barrier(group)
    return ck


def prune_sharded_checkpoints(root: str | Path, keep: int, rank: int) -> None:
    """Rank 0 deletes all but the ``keep`` newest complete checkpoints under ``root`` and any
    incomplete one older than the newest complete (call after :func:`save_sharded_checkpoint`,
    whose last barrier every rank has passed)."""
    if rank != 0:
        return
    plain = set(complete_checkpoints(root))  # a one-process run's, kept by its own pruning
    steps = [p for p in step_dirs(root) if p not in plain]  # moved-aside ones are kept
    done = [p for p in steps if (p / COMPLETE).is_file()]
    if not done:
        return
    kept = set(done[-keep:]) if keep > 0 else set()
    newest = steps.index(done[-1])
    for p in steps[:newest + 1]:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


def latest_sharded_checkpoint(root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint under ``root`` and its marker, or None."""
    found = [p for p in step_dirs(root) if (p / COMPLETE).is_file()]
    if not found:
        return None
    return found[-1], read_marker(found[-1], COMPLETE)


def is_sharded(ck: str | Path) -> bool:
    """Whether checkpoint ``ck`` is a sharded run's (else one process's)."""
    return (Path(ck) / COMPLETE).is_file()


def any_checkpoint(root: str | Path) -> bool:
    """Whether ``root`` holds a complete checkpoint of either kind."""
    return bool(complete_checkpoints(root)) or latest_sharded_checkpoint(root) is not None


def newest_checkpoint(root: str | Path, log: Any = None, move_damaged: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The complete checkpoint of either kind with the highest step under ``root`` that matches its
    manifest and whose trainer state loads, and that state; None when there is none.

    A damaged one is reported through ``log`` (a ``str -> None`` callable) and passed over; with
    ``move_damaged`` (one process, or rank 0 of a run whose other ranks do not look) it is renamed
    ``step-<N>.damaged-<id>``, kept for inspection out of the way of the run that redoes its steps.
    """
    for ck in candidates(root):
        try:
            name = COMPLETE if is_sharded(ck) else "TRAINING.json"
            verify_checkpoint(ck, read_marker(ck, name), name)
            return ck, load_trainer_state(ck)
        except DamoHybridError as e:
            set_aside(ck, e, log, move_damaged)
    return None


def candidates(root: str | Path) -> list[Path]:
    """The complete checkpoints of either kind under ``root``, newest (highest step) first."""
    root = Path(root)
    found = [(int(p.name.split("-")[1]), p) for p in complete_checkpoints(root)]
    found += [(int(p.name.split("-")[1]), p) for p in step_dirs(root) if is_sharded(p)]
    return [ck for _, ck in sorted(found, key=lambda c: c[0], reverse=True)]


def set_aside_ones(root: str | Path) -> list[Path]:
    """The checkpoints under ``root`` that :func:`set_aside` renamed ``step-<N>.damaged-<id>``."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and ".damaged-" in p.name) \
        if root.is_dir() else []


def set_aside(ck: Path, why: Exception, log: Any = None, move: bool = True) -> None:
    """Report checkpoint ``ck`` as unusable through ``log`` and, with ``move``, rename it
    ``step-<N>.damaged-<id>``: kept for inspection, out of the way of the run that redoes its steps."""
    note = "falling back to an older one"
    if move:
        aside = ck.with_name(f"{ck.name}.damaged-{uuid.uuid4().hex[:8]}")
        os.rename(ck, aside)
        note = f"moved it to {aside.name} and {note}"
    if log is not None:
        log(f"skipping checkpoint {ck}: {why}; {note}")


def _parts(ck: Path) -> list[Path]:
    """The store checkpoints of every rank of complete checkpoint ``ck``, of either kind, in rank order."""
    if is_sharded(ck):
        marker = read_marker(ck, COMPLETE)
        if not isinstance(marker.get("world"), int) or marker["world"] < 1:
            raise DamoHybridError(f"checkpoint marker {ck / COMPLETE} is damaged: no number of ranks")
        if marker.get("sharding_version") != SHARDING_VERSION:
            raise DamoHybridError(f"{ck} was sharded by rule {marker.get('sharding_version')}, this version uses "
                                  f"{SHARDING_VERSION}")
        return [_shard_dir(ck, r, int(marker["world"])) for r in range(int(marker["world"]))]
    if ck in complete_checkpoints(ck.parent):
        return [ck / "store"]
    raise DamoHybridError(f"{ck} is not a complete checkpoint (no {COMPLETE} and no one-process marker): "
                          "a rank, or the process, did not finish it")


def restore_shard(ck: str | Path, dest: str | Path, rank: int, world: int,
                  config: StoreConfig = StoreConfig(), tables: list[Any] | None = None) -> EmbeddingStore:
    """Rank ``rank`` of ``world``'s store at ``dest`` (a new directory) from a complete checkpoint
    of any number of ranks (a one-process checkpoint counts as one rank's).

    ``tables``: the run's table configs, checked against the checkpoint's here (a
    :class:`~damo_hybrid.errors.ConfigConflictError`), before the caller swaps the copy in.

    Raises:
        DamoHybridError: ``ck`` is not a complete checkpoint, or of another sharding rule.
    """
    ck, dest = Path(ck), Path(dest)
    parts = _parts(ck)
    old = len(parts)
    if old == world:
        store = EmbeddingStore.from_checkpoint(parts[rank], dest, tables or (), config=config)  # tables checked here
        claim_shard(dest, world, rank)
        return store
    with EmbeddingStore(parts[0], read_only=True) as first:
        tables = list(first.tables.values())
        steps = {t.name: first.step(t.name) for t in tables}
    store = EmbeddingStore(dest, tables, config)
    try:
        for p in parts:
            with EmbeddingStore(p, read_only=True) as part:
                for t in tables:
                    for keys, rows in part.scan(t.name):
                        mine = shard_of(keys, world) == rank
                        if mine.any():
                            store.load_rows(t.name, keys[mine], rows.take(mine))
        for name, step in steps.items():
            store.load_rows(name, np.zeros(0, np.uint64), None, step=step)  # type: ignore[arg-type]
        if any(t.admission is not None for t in tables):
            log.warning("re-sharding %s from %d to %d ranks: admission counters start anew", ck, old, world)
        claim_shard(dest, world, rank)
    except BaseException:
        store.close()
        raise
    if tables:  # reopened with the run's configs: a conflict is refused before the copy is swapped in
        store.close()
        store = EmbeddingStore(dest, tables, config)
    return store
