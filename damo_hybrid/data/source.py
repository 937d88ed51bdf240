"""A stream as the trainer's data: batch ``i``, epoch after epoch, with positions for checkpoints.

:class:`StreamSource` turns a :class:`~damo_hybrid.data.stream.DelimitedStream` into the
``train_batch``/``eval_batch`` callables of :class:`~damo_hybrid.pipeline.trainer.Trainer`;
:class:`EndOfData` is how it says its epochs are done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from .stream import DelimitedStream, Position
from .synthetic import Batch

__all__ = ["StreamSource", "EndOfData", "restart_epoch"]

log = logging.getLogger(__name__)


class EndOfData(Exception):
    """A data source has no batch at this index: its epochs are done (the trainer stops there)."""


def restart_epoch(states: list[dict[str, Any]], index: int) -> dict[str, Any]:
    """A :meth:`StreamSource.state` that starts batch ``index`` at the top of the files, in the
    earliest epoch of ``states``: the positions of a run that split its files over another number
    of ranks (:class:`~damo_hybrid.dist.data.RankStream`), which do not carry over."""
    return {"index": index, "epoch": min(int(s["epoch"]) for s in states), "position": Position().as_dict(),
            "shuffle": states[0].get("shuffle")}


class StreamSource:
    """Batch ``i`` of a stream read epoch after epoch: the ``train_batch``/``eval_batch`` of a
    :class:`~damo_hybrid.pipeline.trainer.Trainer`.

    Batches are read in order; asking for another index re-reads from the start of its epoch
    (or from a position given to :meth:`load_state`). Past the last epoch it raises
    :class:`EndOfData`.

    Args:
        stream: the stream.
        epochs: passes over it (None: no end).
    """

    def __init__(self, stream: DelimitedStream, epochs: int | None = None) -> None:
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.stream, self.epochs = stream, epochs
        self.sparse_fields, self.dense_fields = stream.sparse_fields, stream.dense_fields
        self._it: Iterator[tuple[Batch, Position]] | None = None
        self._next = 0  # the index the iterator yields next
        self._epoch = 0
        self._known: dict[int, tuple[int, Position]] = {0: (0, Position())}  # index -> (epoch, where it starts)

    def __call__(self, i: int) -> Batch:
        if i != self._next or self._it is None:
            if i not in self._known:
                if i < self._next or self._it is None:  # restart from the first batch and read up to it
                    self._open(0, 0, Position())
                while self._next < i:
                    self(self._next)
            else:
                epoch, pos = self._known[i]
                self._open(i, epoch, pos)
        while True:
            if self.epochs is not None and self._epoch >= self.epochs:
                raise EndOfData(f"batch {i} is past the last of {self.epochs} epoch(s)")
            assert self._it is not None
            nxt = next(self._it, None)
            if nxt is not None:
                break
            if self._next == self._epoch_start and self._opened_at_top:
                raise EndOfData("the stream holds no rows")
            self._open(self._next, self._epoch + 1, Position())  # the next epoch starts at the top
        b, after = nxt
        self._next = i + 1
        self._known[self._next] = (self._epoch, after)
        self._known.pop(i - 64, None)  # the pipeline reads a few batches ahead; older ones are not asked again
        return b

    def _open(self, i: int, epoch: int, pos: Position) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
        self._it, self._next, self._epoch = self.stream.batches(pos), i, epoch
        self._epoch_start, self._opened_at_top = i, pos == Position()
        self._known[i] = (epoch, pos)

    def state(self, i: int) -> dict[str, object]:
        """Where batch ``i`` starts (for a checkpoint taken before it)."""
        if i not in self._known:
            raise KeyError(f"batch {i} was not reached")
        epoch, pos = self._known[i]
        return {"index": i, "epoch": epoch, "position": pos.as_dict(),
                "shuffle": {"buffer": self.stream.shuffle_buffer, "seed": self.stream.seed}}

    def load_state(self, d: dict[str, object]) -> None:
        """Resume at the batch :meth:`state` described, without reading up to it.

        A state of a run that split its files over ranks (``ranks``: each rank's) restarts its
        epoch at the top of the files: the files are dealt differently here.

        Raises:
            ValueError: the state was saved with another shuffle buffer or seed.
        """
        if isinstance(d.get("ranks"), list):
            log.warning("the checkpoint's data positions are those of %s ranks that split the files; this run "
                        "reads them all, so its epoch restarts at the top of the files", d.get("world"))
            d = restart_epoch(d["ranks"], int(d["ranks"][0]["index"]))
        saved = d.get("shuffle") or {"buffer": 0, "seed": self.stream.seed}
        mine = {"buffer": self.stream.shuffle_buffer, "seed": self.stream.seed}
        if saved["buffer"] != mine["buffer"] or (saved["buffer"] and saved["seed"] != mine["seed"]):  # type: ignore[index]
            raise ValueError(f"the checkpoint's data was read with shuffle buffer {saved['buffer']} and seed "  # type: ignore[index]
                             f"{saved['seed']}, this run asks for {mine['buffer']} and {mine['seed']}: resume with "  # type: ignore[index]
                             "the same --shuffle-buffer and --seed")
        pos = Position(**d["position"])  # type: ignore[arg-type]
        self._known = {int(d["index"]): (int(d["epoch"]), pos)}  # type: ignore[arg-type]
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
        self._it = None
