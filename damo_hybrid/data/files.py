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

__all__ = ["expand_paths", "ahead", "skip_bytes", "line_start", "byte_part"]

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


def line_start(path: Path, at: int) -> int:
    """The byte offset of the first line of ``path`` that starts at or after byte ``at`` (the
    file's size when none does)."""
    if at <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(at - 1)  # the line that holds byte at - 1 ends at the first newline from there
        pos = at - 1
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                return pos
            nl = chunk.find(b"\n")
            if nl >= 0:
                return pos + nl + 1
            pos += len(chunk)


def byte_part(paths: Sequence[Path], rank: int, world: int) -> list[tuple[int, int, int]]:
    """Rank ``rank``'s share of plain-text files read as one run of bytes, cut into ``world`` parts
    of equal size at line starts: ``(file index, first byte, end byte)`` of each piece, in order.

    A line belongs to the part that holds its first byte, so the parts cover every line once.

    Raises:
        ValueError: a file is compressed (it cannot be cut by byte; give one file per rank).
    """
    packed = [p for p in paths if p.suffix == ".gz"]
    if packed:
        raise ValueError(f"{packed[0]} is compressed and cannot be split by byte range over {world} ranks: give "
                         f"at least {world} files (each rank then reads its own) or decompress it")
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    lo, hi = rank * total // world, (rank + 1) * total // world
    out: list[tuple[int, int, int]] = []
    base = 0
    for i, (p, n) in enumerate(zip(paths, sizes)):
        a, b = max(lo, base) - base, min(hi, base + n) - base
        if a < b:  # the lines that start in bytes [a, b) of this file
            a = line_start(p, a)
            b = n if b >= n else line_start(p, b)
            if a < b:
                out.append((i, a, b))
        base += n
    return out
