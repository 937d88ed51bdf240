"""Streaming parquet: a row group at a time, in flat memory, with the loaded reader's keys.

:class:`ParquetStream` is a :class:`~damo_hybrid.data.stream.DelimitedStream` whose blocks are
parquet row groups: the schema's columns of one row group are read, cast to the types the fast
path takes (float64 label and dense values, strings or int64 ids) and converted by it; a row group
it will not judge (a null label, a value that does not cast) goes through the loaded reader's
conversion (:func:`~damo_hybrid.data.parquet.parquet_table`), so keys and errors are the same as
:func:`~damo_hybrid.data.readers.read_dataset`'s. A :class:`~damo_hybrid.data.stream.Position`'s
``offset`` is the row group's number.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from .blocks import Block, Position
from .files import cause
from .parquet import check_numeric_columns, parquet_error, parquet_table
from .schema import Schema
from .stream import DelimitedStream

__all__ = ["ParquetStream"]


class ParquetStream(DelimitedStream):
    """Batches of one or more parquet files, read a row group at a time (see the module doc).

    Args: as :class:`~damo_hybrid.data.stream.DelimitedStream`; ``block_mb`` is unused (a block
    is a row group).
    """

    splits_by_bytes = False  # split over ranks by file only

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], schema: Schema,
                 batch_size: int = 4096, **kwargs: Any) -> None:
        super().__init__(paths, schema, batch_size, **kwargs)

    def _blocks(self, start: Position) -> Iterator[tuple[Block, Any]]:
        import pyarrow.parquet as pq

        s = self.schema
        want = [s.label, *s.dense, *s.sparse]
        rows = 0
        for fi in range(start.file, len(self.paths)):
            path = self.paths[fi]
            try:
                f = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several types for a file that is not parquet
                raise ValueError(f"{path}: cannot read as parquet: {cause(e)}") from e
            missing = [c for c in want if c not in f.schema_arrow.names]
            if missing:  # (pyarrow's own message lists the whole file schema over many lines)
                raise ValueError(parquet_error(path, want, KeyError(missing)))
            check_numeric_columns(path, f.schema_arrow, s)
            first_group = start.offset if fi == start.file else 0
            for g in range(first_group, f.num_row_groups):
                try:
                    table = f.read_row_group(g, columns=want)
                except Exception as e:
                    raise ValueError(f"{path}: cannot read row group {g}: {cause(e)}") from e
                fast = _fast_input(table, s)
                block = self._fast(*fast) if fast is not None else None
                if block is None:
                    before = sum(f.metadata.row_group(i).num_rows for i in range(g))
                    data = parquet_table(path, table, self.batch_size, s, allow_empty=True, first_row=before)
                    self.skipped += data.skipped
                    block = Block(data.sparse, data.dense, data.label)
                block, skip, first, rows = self._frame(start, fi, g, block, rows)

                def after(used: int, fi: int = fi, g: int = g, n: int = len(block) + skip, base: int = skip,
                          first: int = first, rows: int = rows) -> Position:
                    if used + base >= n:
                        return Position(fi, g + 1, 1, 0, rows)
                    return Position(fi, g, 1, used + base, first)
                yield block, after


def _fast_input(table: Any, s: Schema) -> tuple[Any, Schema] | None:
    """The columns in the fast path's types, and the schema it reads them with (integer id columns
    hashed as ids, as the loaded reader does), or None where the loaded reader must decide."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as pat

    cols, ints = [], []
    for c in (s.label, *s.dense):
        col = table.column(c)
        if not (pat.is_integer(col.type) or pat.is_floating(col.type)):
            return None
        cols.append(col.cast(pa.float64()))
    for c in s.sparse:
        col = table.column(c)
        if pat.is_integer(col.type) and col.null_count == 0:
            cols.append(col.cast(pa.int64(), safe=False))  # a uint64 id keeps its bits, as the loaded reader's
            ints.append(c)
        elif (pat.is_string(col.type) or pat.is_large_string(col.type)) and c not in s.int_sparse:
            cols.append(pc.fill_null(col, "") if col.null_count else col)  # null: the field's "missing" key
        else:
            return None
    return pa.table(cols, names=[s.label, *s.dense, *s.sparse]), replace(s, int_sparse=tuple(ints))
