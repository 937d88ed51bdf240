"""Which rank owns a key: the sharding rule of a table split over ranks.

A key belongs to rank ``mix64(key ^ SALT) mod world`` (:func:`shard_of`): a stable hash, the same
in every process and run, so any rank can compute any key's owner without asking. It is salted
apart from the caches' key index (which hashes ``mix64(key)``), so a shard's keys still spread
over its own index. The rule is versioned (:data:`SHARDING_VERSION`): a store records the
version, world size and rank it was written with, and a different rule never reads it silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigConflictError, DamoHybridError
from ..keys.hashing import mix64
from ..storage.files import atomic_file

__all__ = ["SHARDING_VERSION", "SHARD_FILE", "shard_of", "split_by_owner", "claim_shard", "refuse_lone_shard"]

SHARD_FILE = "shard.json"  # in a shard's store: {"sharding_version", "world", "rank"}

SHARDING_VERSION = 1
_SALT = np.uint64(0x5348_4152_4421_0001)


def shard_of(keys: np.ndarray, world: int) -> np.ndarray:
    """int64 (N,) the owning rank of each of uint64 (N,) ``keys`` among ``world`` ranks."""
    if world == 1:
        return np.zeros(len(keys), np.int64)
    return (mix64(np.asarray(keys, np.uint64) ^ _SALT) % np.uint64(world)).astype(np.int64)


def split_by_owner(keys: np.ndarray, world: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order int64 (N,), counts int64 (world,))``: ``keys[order]`` lists rank 0's keys first,
    then rank 1's, ...; ``counts[r]`` of them go to rank ``r`` (a stable order within a rank)."""
    owner = shard_of(keys, world)
    return np.argsort(owner, kind="stable"), np.bincount(owner, minlength=world).astype(np.int64)


def _read_claim(p: Path) -> dict:
    """The parsed shard record ``p``; a damaged one is a one-line error naming it."""
    try:
        have = json.loads(p.read_text())
    except ValueError as e:
        raise DamoHybridError(f"shard record {p} is damaged (not valid JSON: {str(e)[:60]}); restore the store "
                              "from a checkpoint") from None
    if not isinstance(have, dict):
        raise DamoHybridError(f"shard record {p} is damaged (not a JSON object); restore the store from a checkpoint")
    return have


def claim_shard(root: Path | None, world: int, rank: int) -> None:
    """Record in the store at ``root`` that it holds shard ``rank`` of ``world`` under this rule
    (``shard.json``, written atomically), or check the record it has.

    Raises:
        ConfigConflictError: the store holds another shard, of another world size or rule.
    """
    if root is None:  # an in-memory store: nothing outlives the run
        return
    want = {"sharding_version": SHARDING_VERSION, "world": world, "rank": rank}
    p = Path(root) / SHARD_FILE
    if p.exists():
        have = _read_claim(p)
        if have != want:
            raise ConfigConflictError(
                f"store {root} holds shard {have.get('rank')} of {have.get('world')} (sharding rule "
                f"{have.get('sharding_version')}), and this is rank {rank} of {world}: give each rank its own "
                "store, or restore a checkpoint onto this number of ranks (it re-shards the rows)")
        return
    with atomic_file(p) as f:
        f.write(json.dumps(want, sort_keys=True).encode())


def refuse_lone_shard(root: Path | None) -> None:
    """Refuse to train a shard of a run on ranks outside such a run: a collection over the store at
    ``root`` when it records shard ``r`` of ``W > 1`` and this process is not one of ``W`` ranks
    (it would add rows of keys that other ranks own).

    Raises:
        ConfigConflictError: the store is such a shard.
    """
    p = Path(root) / SHARD_FILE if root is not None else None
    if p is None or not p.exists():
        return
    have = _read_claim(p)
    world = int(have.get("world", 1))
    if world <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world:
        return
    raise ConfigConflictError(
        f"store {root} holds shard {have.get('rank')} of a run on {world} ranks: train it from that rank of a "
        f"{world}-rank run, or restore the run's checkpoint onto one process "
        "(damo_hybrid.dist.restore_shard(ck, dest, 0, 1), or train --resume) to train all its rows here")
