"""Each rank reads its own part of the input: a stream split over the ranks, its epochs ending together.

Rank ``r`` of ``W`` reads (the streams take ``part=(r, W)``), in batches of its share of the
global batch:

- with at least ``W`` files (a glob or a directory): files ``r, r + W, r + 2W, ...`` of the
  sorted list and nothing else. The held-out split hashes each file's global number, so its rows
  are the same as in one process;
- with fewer (a single file, say), plain text: its ``1 / W`` of the files' bytes read as one
  run, cut at line starts (a line belongs to the part holding its first byte). It seeks to its
  part and never reads the bytes before it, except to count lines when an error must name one.
  The held-out split counts rows from the part's start, so which rows it holds out depends on
  ``W``. Compressed files and parquet cannot be cut by byte: with fewer files than ranks every
  rank reads them whole (the CLI says so).

:class:`RankStream` makes the ranks agree where the data ends: before each batch every rank
says whether it has one (a one-int all-reduce over a gloo group of its own), and when any rank's
part is done, every rank's data ends at that batch (the longer ranks' last rows of that pass
are not trained, as with ``drop_last``). The ranks thus run the same number of steps, which every
collective of a step needs. Its state for a checkpoint holds every rank's position; resumed on the
same number of ranks each rank continues where it stopped, on another number the input is
dealt anew, so the run restarts its epoch from the top (logged).

Runs split this way see every row of an epoch (less those tails) in another order than one
process; ``--rank-input all`` reads the whole input on every rank and gives each its slice of
each global batch (:meth:`~damo_hybrid.cli.distributed.Ranks.part`), equal to one process exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from ..data.source import EndOfData, StreamSource, restart_epoch
from .exchange import lost_rank_as_error

__all__ = ["RankStream"]

log = logging.getLogger(__name__)


class RankStream:
    """This rank's stream of a run split by file, ending where the first rank's data ends.

    Args:
        source: this rank's batches (a stream given ``part=(rank, world)``).
        group: a gloo process group of every rank, used only for this (from any one thread at a time).
    """

    own_part = True  # batches of this rank's own part of the input, not slices of global ones

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
        with lost_rank_as_error("end-of-data check"):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if not int(flag[0]):
            raise EndOfData(f"batch {i}: the files of rank {self.rank if not has else 'another'} are done")
        return b

    def state(self, i: int) -> dict[str, Any]:
        """Every rank's position at batch ``i`` (a collective: every rank calls it)."""
        parts: list[Any] = [None] * self.world
        with lost_rank_as_error("gathering of the input positions"):
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
            log.warning("the checkpoint's data positions were taken on %s rank(s); this run deals the input "
                        "over %d ranks, so its epoch restarts at the top of the input (a held-out split of an "
                        "input cut by byte range holds out other rows on another number of ranks)",
                        d.get("world", 1), self.world)
        self.source.load_state(restart_epoch(ranks, index))
