"""Reading input files: path expansion, a text file's lines (gzip or not), the messages for a file
that cannot be read (gzip under another name, truncated, not UTF-8), byte ranges cut at line
starts, and a generator run ahead by a thread of its own (reading, gunzip and parsing release the
GIL, so the next block is ready when the consumer asks)."""

from __future__ import annotations

import glob
import gzip
import io
import os
import queue
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = ["expand_paths", "text_lines", "check_not_gzip", "unreadable", "not_text", "cause", "ahead", "skip_bytes",
           "line_start", "byte_part"]

T = TypeVar("T")

_GZIP_MAGIC = b"\x1f\x8b"


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


# ------------------------------------------------------------------ text lines and their errors
def cause(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, its middle cut out past ``limit`` characters
    (a library's message may hold a whole schema, or the bytes it choked on)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    if len(text) <= limit:
        return text
    return text[:limit * 2 // 3] + " ... " + text[-(limit // 3):]


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a text file, gzip or not."""
    gz = path.suffix == ".gz"
    if not gz:
        check_not_gzip(path)
    opener = gzip.open if gz else open
    lineno = 0
    try:
        with opener(path, "rb") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="\n")  # -sig: a leading BOM is not data
            for lineno, line in enumerate(text, 1):
                yield lineno, line.rstrip("\r\n")
    except UnicodeDecodeError as e:  # the decoder reads ahead: find the line and byte again
        line, at = _first_undecodable(path)
        raise ValueError(not_text(path, line, at, gz)) from e
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(unreadable(path, lineno + 1, e)) from e


def check_not_gzip(path: Path) -> None:
    """Refuse gzip data under a name without ``.gz`` (it would be read as text and fail as binary)."""
    with open(path, "rb") as f:
        if f.read(2) == _GZIP_MAGIC:
            raise ValueError(f"{path}: holds gzip-compressed data but its name does not end in .gz: "
                             f"rename it to {path.name}.gz")


def unreadable(path: Path, line: int, e: BaseException) -> str:
    """The message for a gzip file that cannot be read at ``line`` (not gzip at all, truncated, corrupt)."""
    if isinstance(e, gzip.BadGzipFile) and line == 1:
        return (f"{path}: not gzip data although its name ends in .gz ({cause(e, 60)}): "
                "rename it without .gz if it is plain text")
    return f"{path}:{line}: unreadable after {line - 1} lines (truncated or corrupt file?): {cause(e, 80)}"


def not_text(path: Path, line: int, at: int, gz: bool) -> str:
    """The message for bytes that are not UTF-8 at byte ``at`` (of the decompressed text when ``gz``)."""
    return (f"{path}:{line}: byte {at}{' of the decompressed text' if gz else ''}: not UTF-8 text "
            "(a binary or compressed file?)")


def _first_undecodable(path: Path) -> tuple[int, int]:
    """(line number, byte offset) of the first byte of a file that is not UTF-8 (the error path only)."""
    opener = gzip.open if path.suffix == ".gz" else open
    at, lineno = 0, 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    return lineno, at + e.start
                at += len(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error):  # a truncated end: the bad byte is in its last line
        return lineno + 1, at
    return max(lineno, 1), at
