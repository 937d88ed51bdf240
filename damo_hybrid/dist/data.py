"""Each rank reads its own files: a stream split over the ranks by file, its epochs ending together.

With an input of at least ``W`` files (a glob or a directory), rank ``r`` of ``W`` reads files
``r, r + W, r + 2W, ...`` of the sorted list and nothing else (the streams take ``part=(r, W)``),
in batches of its share of the global batch. The held-out split hashes each file's global
number, so its rows are the same as in one process.

:class:`RankStream` makes the ranks agree where the data ends: before each batch every rank
says whether it has one (a one-int all-reduce over a gloo group of its own), and when any rank's
files are done, every rank's data ends at that batch (the longer ranks' last rows of that pass
are not trained, as with ``drop_last``). The ranks thus run the same number of steps, which every
collective of a step needs. Its state for a checkpoint holds every rank's position; resumed on the
same number of ranks each rank continues where it stopped, on another number the files are
dealt anew, so the run restarts its epoch from the top of the files (logged).

Runs split by file see every row of an epoch (less those tails) in another order than one
process; runs on one file split each global batch instead (:meth:`~damo_hybrid.cli.distributed.Ranks.part`)
and equal one process exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from ..data.source import EndOfData, StreamSource, restart_epoch

__all__ = ["RankStream"]

log = logging.getLogger(__name__)


class RankStream:
    """This rank's stream of a run split by file, ending where the first rank's data ends.

    Args:
        source: this rank's batches (a stream given ``part=(rank, world)``).
        group: a gloo process group of every rank, used only for this (from any one thread at a time).
    """

    own_files = True  # batches of this rank's own files, not slices of global ones

    def __init__(self, source: StreamSource, group: Any) -> None:
        self.source, self.group = source, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.sparse_fields, self.dense_fields = source.sparse_fields, source.dense_fields

    def __call__(self, i: int) -> Any:
        try:
            b, has = self.source(i), 1
        except EndOfData:
            b, has = None, 0
        flag = torch.tensor([has], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if not int(flag[0]):
            raise EndOfData(f"batch {i}: the files of rank {self.rank if not has else 'another'} are done")
        return b

    def state(self, i: int) -> dict[str, Any]:
        """Every rank's position at batch ``i`` (a collective: every rank calls it)."""
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, self.source.state(i), group=self.group)
        return {"world": self.world, "ranks": parts}

    def load_state(self, d: dict[str, Any]) -> None:
        """Resume this rank at its saved position (same number of ranks), else at the top of its
        files in the saved epoch; a one-process state (no ``ranks``) restarts the epoch too."""
        ranks = d.get("ranks") if isinstance(d.get("ranks"), list) else [d]
        if d.get("world") == self.world and "ranks" in d:
            self.source.load_state(ranks[self.rank])
            return
        index = int(ranks[0]["index"])
        if self.rank == 0:
            log.warning("the checkpoint's data positions were taken on %s rank(s); this run deals the files "
                        "over %d ranks, so its epoch restarts at the top of the files", d.get("world", 1), self.world)
        self.source.load_state(restart_epoch(ranks, index))
