"""libFM input (``label idx:val idx:val ...``): the reference line reader and a stream.

:func:`libfm_lines` parses lines one by one (what :func:`~damo_hybrid.data.readers.read_dataset`
uses for ``libfm``). :class:`LibfmStream` reads files of any size in blocks as
:class:`~damo_hybrid.data.stream.DelimitedStream` does: pyarrow splits a block at spaces, the
index before each ``:`` becomes an int64 id hashed per field (the same keys as the line reader),
and a block pyarrow refuses, or with any value the fast path will not judge, goes through the
line reader, so errors name the same lines. A label is a click where it is positive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import expand_paths, text_lines
from .schema import OnError, Schema
from .stream import DelimitedStream
from .tabular import TabularData, _assemble, _floats, _Rows

__all__ = ["libfm_lines", "libfm_columns", "libfm_schema", "LibfmStream"]

_ODD_SPACE = re.compile(rb"[\t\x0b\x0c\x1c-\x1f\x80-\xff]")  # whitespace str.split() knows beyond " " (and non-ASCII)


def libfm_lines(path: Path, lines: Iterable[tuple[int, str]], batch_size: int, policy: OnError,
                width: int | None = None, allow_empty: bool = False) -> TabularData:
    """Parse ``(line number, line)`` pairs of a libFM file, ``label idx:val ...`` (the reference
    path; the stream falls back to it for a block with a bad line). ``width``: the features per
    line (default: the first line's)."""
    rows = _Rows(path, policy)
    labels: list[str] = []
    toks: list[list[str]] = []
    for lineno, line in lines:
        parts = line.split()
        if not parts:
            continue
        if width is None:
            width = len(parts) - 1
        if len(parts) - 1 != width or width < 1:
            rows.bad(lineno, f"{len(parts) - 1} features, expected {width} (label idx:val ...)")
            continue
        labels.append(parts[0])
        toks.append([t.split(":", 1)[0] for t in parts[1:]])
        rows.lines.append(lineno)
    if width is None or (not toks and not allow_empty):
        raise ValueError(f"{path} holds no rows")
    names = libfm_columns(width)
    cols: dict[str, list[Any]] = {"label": labels, **{nm: list(c) for nm, c in zip(names, zip(*toks))}}
    if not toks:
        cols.update({nm: [] for nm in names})
    raw = _floats(labels)
    # libFM labels are -1/1 (or 0/1): a positive value is a click; unparsable ones stay as read
    cols["label"] = np.where(raw > 0, "1", "0").tolist()
    for i in np.nonzero(np.isnan(raw))[0]:
        cols["label"][i] = labels[i]
    return _assemble(path, batch_size, libfm_schema(width, policy), cols, rows, allow_empty)


def libfm_columns(width: int) -> list[str]:
    """A libFM file's feature columns: ``f0 .. f<width-1>``."""
    return [f"f{j}" for j in range(width)]


def libfm_schema(width: int, policy: OnError = OnError.RAISE) -> Schema:
    """The schema a libFM file is read with: int ids ``f0 ..`` (the index before each ``:``)."""
    names = libfm_columns(width)
    return Schema(("label", *names), "label", (), tuple(names), int_sparse=tuple(names), sep=" ", header=False,
                  on_error=policy)


def _width(path: Path | list[Path]) -> int:
    """The features per line of libFM files (the first non-empty line's, in the first file that has one)."""
    paths = path if isinstance(path, list) else [path]
    for p in paths:
        for _, line in text_lines(p):
            parts = line.split()
            if parts:
                if len(parts) < 2:
                    raise ValueError(f"{p}: the first line holds no features (label idx:val ...)")
                return len(parts) - 1
    raise ValueError(f"{paths[0]} holds no rows" if len(paths) == 1 else
                     f"none of the {len(paths)} files {paths[0]}, ... holds a row")


class LibfmStream(DelimitedStream):
    """libFM files streamed in flat memory (see the module doc); the arguments are
    :class:`~damo_hybrid.data.stream.DelimitedStream`'s, less the schema: the first line of the
    first file gives the width, and ``on_error`` the policy for bad lines."""

    def __init__(self, paths: str | Sequence[str], batch_size: int = 4096, on_error: OnError | str = OnError.RAISE,
                 **kw: Any) -> None:
        self.width = _width(expand_paths(paths))
        super().__init__(paths, libfm_schema(self.width, OnError(on_error)), batch_size, **kw)

    def _text(self, body: bytes) -> None:
        """No compiled fast path: libFM values are ``idx:val``, which the delimited one does not read."""
        return None

    def _arrow_options(self) -> tuple[object, object, object]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        s = self.schema
        read = pacsv.ReadOptions(column_names=list(s.columns), use_threads=True, block_size=1 << 22)
        parse = pacsv.ParseOptions(delimiter=" ", quote_char=False, double_quote=False, escape_char=False,
                                   newlines_in_values=False, ignore_empty_lines=True)
        convert = pacsv.ConvertOptions(column_types={s.label: pa.float64(), **{c: pa.string() for c in s.sparse}},
                                       strings_can_be_null=False, quoted_strings_can_be_null=False)
        return read, parse, convert

    def _arrow(self, body: bytes) -> object:
        """The block as a table of 0/1 labels and int64 ids, or None where anything needs the line reader."""
        import pyarrow as pa
        import pyarrow.compute as pc

        # pyarrow splits at spaces and lines at \n, \r\n or a lone \r; the line reader at any whitespace
        # (str.split) and lines at \n: where they could differ, the line reader decides
        if _ODD_SPACE.search(body) or body.count(b"\r") != body.count(b"\r\n"):
            return None
        t = super()._arrow(body)
        if t is None or not t.num_columns:  # type: ignore[attr-defined]
            return t
        try:
            label = t.column("label")  # type: ignore[attr-defined]
            if label.null_count or not pc.all(pc.is_finite(label)).as_py():  # "nan", "inf": the line reader names them
                return None
            cols = {"label": pc.cast(pc.greater(label, 0.0), pa.float64())}
            for c in self.schema.sparse:
                idx = pc.list_element(pc.split_pattern(t.column(c), ":", max_splits=1), 0)  # type: ignore[attr-defined]
                cols[c] = pc.cast(idx, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        return pa.table(cols)

    def _line_reader(self, path: Path, lines: Iterable[tuple[int, str]]) -> TabularData:
        return libfm_lines(path, lines, self.batch_size, self.schema.on_error, self.width, allow_empty=True)
