"""Reading input files: path expansion, and a generator run ahead by a thread of its own (reading,
gunzip and parsing release the GIL, so the next block is ready when the consumer asks)."""

from __future__ import annotations

import glob
import io
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = ["expand_paths", "ahead", "skip_bytes"]

T = TypeVar("T")


def expand_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files of a path, a glob, a directory (its files, sorted) or a list of those.

    Raises:
        FileNotFoundError: a path matches no file.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(item)) if Path(q).is_file())
        else:
            found = [p] if p.is_file() else []
        if not found:
            raise FileNotFoundError(f"no data file at {item}")
        out += found
    return out


_DONE = object()


def ahead(items: Iterator[T], depth: int, name: str = "damo-parse") -> Iterator[T]:
    """``items``, produced by a thread up to ``depth`` ahead (its exceptions re-raised here);
    closing the iterator stops the thread."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(x: object) -> bool:
        """Hand ``x`` over unless the consumer has closed; True when handed over."""
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer
            put(e)

    th = threading.Thread(target=run, name=name, daemon=True)
    th.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        th.join(timeout=5)


def skip_bytes(f: io.BufferedIOBase, n: int) -> None:
    """Read past ``n`` bytes of a stream that cannot seek (gzip)."""
    while n:
        got = f.read(min(n, 1 << 24))
        if not got:
            return
        n -= len(got)
