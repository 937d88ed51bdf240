"""Delimited text (CSV/TSV with a declared :class:`~damo_hybrid.data.schema.Schema`) parsed line by
line: the reference reader. The streaming reader falls back to it for a block with a bad line, so
errors name the same lines."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .files import text_lines
from .schema import Schema
from .tabular import TabularData, _assemble, _empty, _Rows

__all__ = ["read_delimited", "delimited_lines"]


def read_delimited(path: Path, batch_size: int, s: Schema) -> TabularData:
    """A whole delimited file, plain or ``.gz``."""
    return delimited_lines(path, text_lines(path), batch_size, s)


def delimited_lines(path: Path, lines: Iterable[tuple[int, str]], batch_size: int, s: Schema,
                    allow_empty: bool = False) -> TabularData:
    """Parse ``(line number, line)`` pairs of a delimited file (the reference line-by-line path;
    the streaming reader falls back to it for a block with a bad line, so errors name the same
    lines). ``allow_empty``: a part of a file may hold no valid row."""
    width = len(s.columns)
    rows = _Rows(path, s.on_error)
    parts_all: list[list[str]] = []
    header_line = list(s.columns)
    for lineno, line in lines:
        if not line.strip():
            continue
        parts = line.split(s.sep)
        if lineno == 1 and (s.header or (s.header is None and parts == header_line)):
            continue
        if len(parts) != width:
            rows.bad(lineno, f"{len(parts)} columns, expected {width} ({', '.join(s.columns[:4])}, ...)")
            continue
        parts_all.append(parts)
        rows.lines.append(lineno)
    if not parts_all:
        if allow_empty:
            return _empty(path, batch_size, s, rows.skipped)
        raise ValueError(f"{path} holds no rows" + (f" ({rows.skipped} malformed lines skipped)" if rows.skipped else ""))
    cols = dict(zip(s.columns, zip(*parts_all)))
    return _assemble(path, batch_size, s, {c: list(cols[c]) for c in (s.label, *s.dense, *s.sparse)}, rows,
                     allow_empty)
