"""Per-stage wall-clock accounting for the benchmarks' breakdowns.

The host side's stages (de-duplication, key index, RocksDB reads, row decode, initialisation,
eviction hand-off, writer) and the worker's (forward, backward, sparse and dense steps) add
their seconds to :data:`CLOCK` while it is enabled. Disabled (the default), a timed block costs
one attribute test. Stages running in different threads overlap, so their sum can exceed the
wall time; each stage is the time its own thread spent in it.

Example:
    >>> from damo_hybrid.timing import CLOCK
    >>> CLOCK.enable()
    >>> with CLOCK("index"):
    ...     pass
    >>> sorted(CLOCK.snapshot())
    ['index']
    >>> CLOCK.disable()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["CLOCK", "StageClock"]


class StageClock:
    """Seconds and calls per named stage, from any thread."""

    def __init__(self) -> None:
        self.enabled = False
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def enable(self) -> None:
        """Start counting, from zero."""
        self.reset()
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()
            self._counts.clear()

    def add(self, stage: str, seconds: float, count: int = 0) -> None:
        """Add ``seconds`` (and ``count`` items, e.g. keys) to ``stage``."""
        if not self.enabled:
            return
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds
            if count:
                self._counts[stage] = self._counts.get(stage, 0) + count

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time a block as ``stage`` (nothing when disabled)."""
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def count(self, stage: str, n: int) -> None:
        """Count ``n`` items under ``stage`` without time (e.g. keys read back)."""
        self.add(stage, 0.0, n)

    def snapshot(self) -> dict[str, float]:
        """Seconds per stage so far."""
        with self._lock:
            return dict(self._seconds)

    def counts(self) -> dict[str, int]:
        """Items per stage so far."""
        with self._lock:
            return dict(self._counts)


#: The process-wide clock the library's stages report to.
CLOCK = StageClock()
