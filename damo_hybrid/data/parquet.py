"""Parquet files read whole (pyarrow, imported on first use): the schema's columns, the checks that
they hold what the schema says, and the conversion of an Arrow table that
:class:`~damo_hybrid.data.parquet_stream.ParquetStream` shares a row group at a time."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import clip
from .files import cause
from .schema import Schema
from .tabular import TabularData, _assemble, _Rows

__all__ = ["read_parquet", "parquet_error", "check_numeric_columns", "parquet_table"]


def read_parquet(path: Path, batch_size: int, s: Schema) -> TabularData:
    """The schema's columns of a whole parquet file."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet needs pyarrow: pip install 'damo-hybrid[data]'") from e
    want = [s.label, *s.dense, *s.sparse]
    try:
        table = pq.read_table(path, columns=want)
    except Exception as e:  # pyarrow raises several types for a bad file or missing column
        raise ValueError(parquet_error(path, want, e)) from e
    return parquet_table(path, table, batch_size, s)


def parquet_error(path: Path, want: list[str], e: BaseException) -> str:
    """One short line for a parquet file pyarrow cannot read: the columns it lacks, or the cause
    (pyarrow's own message may list the whole file schema over many lines)."""
    try:
        import pyarrow.parquet as pq

        have = pq.read_schema(path).names
    except Exception:
        return f"{path}: cannot read as parquet: {cause(e)}"
    missing = [c for c in want if c not in have]
    if missing:
        return (f"{path}: cannot read columns {clip(missing, 80)} ({len(missing)} missing): the file's columns are "
                f"{clip(have, 80)}")
    return f"{path}: cannot read columns of the schema as parquet: {cause(e)}"


def check_numeric_columns(path: Path, table: Any, s: Schema) -> None:
    """Refuse a parquet label or dense column that does not hold numbers (a string column is not
    parsed into floats, nor a bool column into 0/1; a boolean label is a click flag)."""
    import pyarrow as pa
    import pyarrow.types as pat

    schema = table if isinstance(table, pa.Schema) else table.schema  # a file's schema, or a table's
    for c in (s.label, *s.dense):
        t = schema.field(c).type
        if pat.is_integer(t) or pat.is_floating(t) or pat.is_decimal(t) or pat.is_null(t):
            continue
        if c == s.label and pat.is_boolean(t):
            continue
        kind = ("string" if pat.is_string(t) or pat.is_large_string(t) else "bool" if pat.is_boolean(t)
                else clip(str(t), 40))
        what = ("the label column must hold numbers or booleans" if c == s.label
                else "a dense column must hold numbers (int or float)")
        raise ValueError(f"{path}: column {clip(c)} holds {kind} values; {what}")


def parquet_table(path: Path, table: Any, batch_size: int, s: Schema, allow_empty: bool = False,
                  first_row: int = 0) -> TabularData:
    """Convert an Arrow table of a parquet file's schema columns (the whole file, or one row group
    of a stream, whose first row is row ``first_row + 1`` of the file in errors): integer id
    columns without nulls are hashed as ints, others as strings."""
    want = [s.label, *s.dense, *s.sparse]
    check_numeric_columns(path, table, s)
    cols: dict[str, Any] = {}
    ints: set[str] = set()
    for c in want:
        col = table.column(c)
        if c in s.sparse and _is_int_type(col.type) and col.null_count == 0:
            # integer ids stay one int64 array and are hashed as ints, as a CSV's int_sparse columns
            # (a uint64 id keeps its 64 bits: the key of the int64 with the same bits, see hash_feature)
            cols[c] = col.to_numpy().astype(np.int64, copy=False)
            ints.add(c)
        elif c in s.int_sparse and _is_float_type(col.type) and col.null_count == 0:
            cols[c] = col.to_numpy()  # float ids: _int64s takes those equal to an integer, refuses the rest
        else:
            cols[c] = col.to_pylist()
    schema = replace(s, int_sparse=tuple(c for c in s.sparse if c in ints or c in s.int_sparse))
    rows = _Rows(path, s.on_error)
    rows.lines = list(range(first_row + 1, first_row + table.num_rows + 1))
    return _assemble(path, batch_size, schema, cols, rows, allow_empty)


def _is_int_type(t: Any) -> bool:
    import pyarrow.types as pat

    return bool(pat.is_integer(t))


def _is_float_type(t: Any) -> bool:
    import pyarrow.types as pat

    return bool(pat.is_floating(t))
