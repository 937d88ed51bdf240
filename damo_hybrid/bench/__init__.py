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

__all__ = ["machine"]


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

