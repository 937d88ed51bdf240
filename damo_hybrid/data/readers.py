"""File datasets by format name: delimited text (Criteo, Avazu, MovieLens ``u.data``, any CSV/TSV
with a declared schema), libFM lines and parquet, each parsed by its reader into a
:class:`~damo_hybrid.data.tabular.TabularData` of hashed keys, dense arrays and labels.

A file is parsed once, at construction; batches are slices of those arrays, so ``batch(i)`` is
random-access and a resumed run sees the same data. Epochs wrap around the file. How values
become keys and what a bad line does: :mod:`~damo_hybrid.data.tabular`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .delimited import read_delimited
from .files import text_lines
from .libfm import libfm_lines
from .parquet import read_parquet
from .schema import FORMATS, OnError, Schema
from .tabular import TabularData

__all__ = ["read_dataset", "CriteoTSV"]


def read_dataset(path: str | os.PathLike[str], fmt: str = "criteo", batch_size: int = 4096,
                 schema: Schema | None = None) -> TabularData:
    """Parse a file of format ``fmt`` (see :data:`~damo_hybrid.data.schema.FORMATS`).

    Args:
        path: the file; ``.gz`` is decompressed on the fly.
        fmt: a key of :data:`~damo_hybrid.data.schema.FORMATS`.
        batch_size: samples per batch.
        schema: overrides the format's built-in schema (required for ``csv`` and ``parquet``).
    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown format, missing schema, or bad input (names file and line).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no data file {p}")
    if fmt == "libfm":
        return libfm_lines(p, text_lines(p), batch_size, schema.on_error if schema else OnError.RAISE)
    schema = schema or FORMATS[fmt]
    if schema is None:
        raise ValueError(f"format {fmt!r} needs a schema (columns, label, dense, sparse): give one in the config file")
    if fmt == "parquet":
        return read_parquet(p, batch_size, schema)
    return read_delimited(p, batch_size, schema)


def CriteoTSV(path: str | os.PathLike[str], batch_size: int = 4096) -> TabularData:  # noqa: N802 (kept name)
    """A Criteo-format file (label, I1..I13, C1..C26, tab-separated; plain or gzip)."""
    return read_dataset(path, "criteo", batch_size)
