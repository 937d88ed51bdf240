"""Benchmark harnesses behind ``damo-hybrid bench``; nothing in the library imports them.

- :mod:`.store`: store lookup/apply keys/s straight from RocksDB.
- :mod:`.train`: training throughput against in-memory torch embeddings.
- :mod:`.gpu`: the GPU tier against every row in accelerator memory.
- :mod:`.quality`: AUC/logloss parity with in-memory torch on the shared real datasets.
- :mod:`.host`: the host manager alone, unique keys/s per core over threads.
- :mod:`.baseline`: the in-memory torch embeddings those comparisons train against.
"""

from __future__ import annotations

import os
import platform

from ..errors import DamoHybridError

__all__ = ["machine", "CheckFailed", "RankFailed"]


class CheckFailed(Exception):
    """A benchmark ran, and a check it makes failed (a reader lost rows, a rank failed):
    ``damo-hybrid bench`` prints the message and exits 1."""


class RankFailed(DamoHybridError):
    """A rank of a benchmark on several processes (``bench --dist``) stopped, and nothing was
    measured: the message names the rank and the cause in one line. ``died``: a signal or an exit
    without an error of its own ended it (the system stopped it: exit status 3); else it raised
    (exit status 2, or 3 where its error is a system's refusal, a full disk say)."""

    def __init__(self, message: str, died: bool) -> None:
        super().__init__(message)
        self.died = died

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.died))


def machine() -> str:
    """The machine in words, for every benchmark's report: CPU model, cores, OS and Python."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {platform.system()}, python {platform.python_version()}"

