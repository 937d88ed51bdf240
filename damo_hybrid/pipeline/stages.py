"""The three-stage training pipeline: loader -> host manager -> worker.

- **Loader** (thread ``damo-loader``): builds batch ``i`` (parse, hash) ahead of time.
- **Host manager** (thread ``damo-host``): makes the next batch's rows resident and pinned
  (``prepare``) while the worker trains the current one.
- **Worker** (the caller's thread): forward, backward, sparse and dense optimizer steps.

Queues between stages are bounded (``depth``). The host manager never copies row values
ahead: it only makes rows resident and pins them; the worker reads them at forward time, after
the previous step was applied, so a key shared by batches t and t+1 sees t's update in t+1
and a pipelined run equals the sequential loop.

An exception in any stage stops every stage and is re-raised in the caller's thread as
:class:`~damo_hybrid.errors.PipelineError` with the stage's exception as its cause. Leaving
the ``with`` block (normally, by an error, or by Ctrl-C) stops and joins both threads and
releases the pins of batches prepared but never trained.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch.profiler import record_function

from ..data.files import cause
from ..data.source import EndOfData
from ..errors import PipelineError

__all__ = ["worker_threads", "Pipeline", "PipelineStats"]

log = logging.getLogger(__name__)

B = TypeVar("B")
P = TypeVar("P")
_POLL = 0.05


class _Done:
    pass


@dataclass
class _Failed:
    stage: str
    exc: BaseException


@dataclass
class PipelineStats:
    """Seconds per stage; ``*_stall`` is time a stage waited on its input queue."""

    load: float = 0.0
    prepare: float = 0.0
    prepare_stall: float = 0.0
    loader_wait: float = 0.0  # the part of prepare_stall spent waiting for the loader (not for permits)
    worker_stall: float = 0.0
    batches: int = 0
    # with Pipeline(timeline=[...]): (stage, start, end) perf_counter intervals of load and prepare
    timeline: list[tuple[str, float, float]] | None = None


class Pipeline(Generic[B, P]):
    """Runs ``load`` and ``prepare`` ahead of the caller.

    Args:
        load: batch index -> batch (runs in the loader thread).
        prepare: batch -> prepared batch (runs in the host-manager thread).
        release: undoes ``prepare`` for a batch that will never be trained (unpins rows).
        start, stop: batch indices ``start <= i < stop``.
        depth: capacity of the loader's queue (loaded batches waiting for the host manager).
        timeline: a list to append ``(stage, start, end)`` intervals to (for a timeline plot).
        in_flight: prepared batches alive at once, counting the one the caller trains: 2 is
            ScaleFreeCTR's double buffering (train t while t+1 is made resident); each holds its
            rows pinned, so this bounds the pinned rows to ``in_flight`` batches.

    Yields:
        ``(index, batch, prepared)`` in order.
    """

    def __init__(self, load: Callable[[int], B], prepare: Callable[[B], P], release: Callable[[P], None],
                 start: int, stop: int, depth: int = 2, in_flight: int = 2,
                 timeline: list[tuple[str, float, float]] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self._load, self._prepare, self._release = load, prepare, release
        self._start, self._stop = start, stop
        self._q1: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._q2: queue.Queue[Any] = queue.Queue(maxsize=1)  # one batch prepared ahead: exactness needs no more
        self._halt = threading.Event()
        self._permits = threading.Semaphore(in_flight)  # taken by prepare, given back when trained
        self.stats = PipelineStats(timeline=timeline)
        self._threads = [
            threading.Thread(target=self._loader, name="damo-loader", daemon=True),
            threading.Thread(target=self._host_manager, name="damo-host", daemon=True),
        ]

    # ------------------------------------------------------------ threads
    def _record(self, stage: str, t0: float) -> None:
        t1 = time.perf_counter()
        setattr(self.stats, stage, getattr(self.stats, stage) + t1 - t0)
        if self.stats.timeline is not None:
            self.stats.timeline.append((stage, t0, t1))  # list.append is atomic under the GIL

    def _put(self, q: queue.Queue[Any], item: Any) -> bool:
        while not self._halt.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                if self._halt.is_set():
                    return _Done()

    def _loader(self) -> None:
        try:
            for i in range(self._start, self._stop):
                t0 = time.perf_counter()
                with record_function("damo.load"):
                    try:
                        b = self._load(i)
                    except EndOfData:  # the data's epochs are done: end the run here
                        break
                self._record("load", t0)
                if not self._put(self._q1, (i, b)):
                    return
            self._put(self._q1, _Done())
        except BaseException as e:  # noqa: BLE001 - forwarded to the caller's thread
            self._put(self._q1, _Failed("loader", e))

    def _host_manager(self) -> None:
        try:
            while True:
                t0 = time.perf_counter()
                item = self._get(self._q1)
                waited = time.perf_counter() - t0
                self.stats.prepare_stall += waited
                self.stats.loader_wait += waited
                if isinstance(item, (_Done, _Failed)):
                    self._put(self._q2, item)
                    return
                i, b = item
                t0 = time.perf_counter()
                while not self._permits.acquire(timeout=_POLL):
                    if self._halt.is_set():
                        return
                self.stats.prepare_stall += time.perf_counter() - t0
                t0 = time.perf_counter()
                with record_function("damo.prepare"):
                    p = self._prepare(b)
                self._record("prepare", t0)
                if not self._put(self._q2, (i, b, p)):
                    self._release(p)
                    return
        except BaseException as e:  # noqa: BLE001 - forwarded to the caller's thread
            self._put(self._q2, _Failed("host manager", e))

    # ------------------------------------------------------------ caller
    def __enter__(self) -> Pipeline[B, P]:
        for t in self._threads:
            t.start()
        return self

    def __iter__(self) -> Iterator[tuple[int, B, P]]:
        trained = False
        while True:
            if trained:  # the caller asks for the next batch: the previous one is done
                self._permits.release()
            t0 = time.perf_counter()
            item = self._get(self._q2)
            self.stats.worker_stall += time.perf_counter() - t0
            if isinstance(item, _Failed):
                raise PipelineError(f"the {item.stage} stage failed: {_summary(item.exc)}") from item.exc
            if isinstance(item, _Done):
                return
            self.stats.batches += 1
            trained = True
            yield item

    def close(self) -> None:
        """Stop both threads, release prepared batches never trained, join."""
        self._halt.set()
        for t in self._threads:
            t.join(timeout=30)
            if t.is_alive():  # pragma: no cover - a stage stuck in user code
                log.warning("pipeline thread %s did not stop within 30 s", t.name)
        while True:
            try:
                item = self._q2.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                self._release(item[2])

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary(e: BaseException) -> str:
    """What a stage's exception adds to the one line the command line prints: the first line of
    its message, at most about 200 characters in all (the whole text stays in the cause), after
    its type unless it is a plain ``ValueError``, bad input whose message names the file and line.
    Not ``repr``, which quotes the message again and doubles or escapes the quotes inside it."""
    name = type(e).__name__
    text = cause(e, 160)
    if text == name:  # no message
        return name
    return text if type(e) is ValueError else f"{name}: {text}"


def worker_threads(cores: int | None = None, prefetch: bool = True, parts: int = 1) -> int:
    """Torch threads for the worker: every core, less one for the host side when it runs
    beside the worker (prefetch), so the stages do not oversubscribe the cores; shared by the
    ``parts`` its dense compute runs in at once (:mod:`damo_hybrid.pipeline.split`)."""
    cores = cores or os.cpu_count() or 1
    return max(1, (max(1, cores - 1) if prefetch else cores) // parts)
