"""File datasets: delimited text (Criteo, Avazu, MovieLens ``u.data``, any CSV/TSV with a declared
schema), libFM lines and parquet, parsed into hashed keys, dense arrays and labels.

A file is parsed once, at construction, into per-field uint64 keys
(:func:`~damo_hybrid.keys.hashing.hash_feature`, salted by the field name), float32 dense features
and float32 labels; batches are slices of those arrays, so ``batch(i)`` is random-access and a
resumed run sees the same data. Epochs wrap around the file.

Values:

- a **sparse** column is hashed as a string (``"str"``, the default) or, when the schema lists
  it in ``int_sparse``, as an int64 id; a missing value (empty) is a key of its own per field;
- a **dense** column is a number (empty = missing). ``DenseMode.LOG1P`` feeds
  ``log1p(max(x, 0))`` to the dense layers; ``DenseMode.BUCKETIZE`` turns each dense column into
  a sparse field of buckets ``floor(log(x) ** 2)`` for ``x > 2`` and ``x`` otherwise (the usual
  Criteo treatment; missing is its own bucket); ``DenseMode.BOTH`` does both;
- the **label** is 0/1, or ``value >= label_threshold`` when the schema sets one (MovieLens
  ratings >= 4 are clicks), or ``value > 0`` for libFM's ``-1``/``1``.

Bad input: a wrong column count, a non-numeric label or dense value, a label that is not 0/1, an
int id out of the int64 range, an empty file or a truncated gzip raise ``ValueError`` naming the
file and line, unless the schema says ``on_error="skip"``: then malformed lines are dropped and
counted in :attr:`TabularData.skipped` (an empty or truncated file is always an error).
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ..config import reject_unknown
from ..keys.hashing import hash_feature
from .synthetic import Batch

__all__ = ["DenseMode", "OnError", "Schema", "TabularData", "FORMATS", "read_dataset", "CriteoTSV"]

log = logging.getLogger(__name__)


class DenseMode(str, Enum):
    """What becomes of dense columns."""

    LOG1P = "log1p"
    BUCKETIZE = "bucketize"
    BOTH = "both"


class OnError(str, Enum):
    """What a malformed line does: raise naming file and line, or get dropped and counted."""

    RAISE = "raise"
    SKIP = "skip"


@dataclass(frozen=True)
class Schema:
    """The columns of a delimited file (or the columns to read from a parquet file).

    Args:
        columns: every column name, in file order (for parquet: may be empty; the file names them).
        label: the label column.
        dense: numeric columns.
        sparse: categorical columns, hashed per field.
        int_sparse: the subset of ``sparse`` declared as int64 ids (hashed as ints, so the
            same id in a CSV and a parquet file is the same key); a value that is not an int64
            is a bad line.
        sep: the delimiter.
        header: ``True``: the first line names the columns and is skipped; ``False``: no
            header; ``None``: skip the first line only when it equals ``columns``.
        label_threshold: ``label = value >= label_threshold``; ``None``: the label must be 0 or 1.
        dense_mode: see :class:`DenseMode`.
        on_error: see :class:`OnError`.
    Columns named in none of ``label``/``dense``/``sparse`` are ignored.
    """

    columns: tuple[str, ...]
    label: str
    dense: tuple[str, ...] = ()
    sparse: tuple[str, ...] = ()
    int_sparse: tuple[str, ...] = ()
    sep: str = ","
    header: bool | None = None
    label_threshold: float | None = None
    dense_mode: DenseMode = DenseMode.LOG1P
    on_error: OnError = OnError.RAISE

    def __post_init__(self) -> None:
        for name in ("columns", "dense", "sparse", "int_sparse"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(c, str) for c in v):
                raise TypeError(f"Schema.{name} must be a sequence of column names, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        object.__setattr__(self, "dense_mode", DenseMode(self.dense_mode))
        object.__setattr__(self, "on_error", OnError(self.on_error))
        used = [self.label, *self.dense, *self.sparse]
        if len(set(used)) != len(used):
            raise ValueError(f"a column is used twice among label {self.label!r}, dense {self.dense}, sparse {self.sparse}")
        if self.columns:
            unknown = [c for c in used if c not in self.columns]
            if unknown:
                raise ValueError(f"columns {unknown} are not among the schema's columns {self.columns}")
            if len(set(self.columns)) != len(self.columns):
                raise ValueError(f"duplicate column names in {self.columns}")
        if not set(self.int_sparse) <= set(self.sparse):
            raise ValueError(f"int_sparse {self.int_sparse} must be a subset of sparse {self.sparse}")
        if not self.sparse and not self.dense:
            raise ValueError("a schema needs at least one dense or sparse column")
        if not self.sep or self.sep in "\r\n":
            raise ValueError(f"sep must be a non-empty delimiter other than a newline, got {self.sep!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schema:
        """Build from a plain mapping (a ``[schema]`` TOML table); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        reject_unknown("schema keys", d, known)
        return cls(**d)


def _criteo_schema() -> Schema:
    dense = tuple(f"I{i + 1}" for i in range(13))
    sparse = tuple(f"C{i + 1}" for i in range(26))
    return Schema(("label", *dense, *sparse), "label", dense, sparse, sep="\t", header=False)


def _avazu_schema() -> Schema:
    cols = ("id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
            "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
            "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21")
    return Schema(cols, "click", (), cols[2:], sep=",", header=None)


def _movielens_schema() -> Schema:
    return Schema(("user_id", "item_id", "rating", "timestamp"), "rating", (), ("user_id", "item_id"),
                  int_sparse=("user_id", "item_id"), sep="\t", header=False, label_threshold=4.0)


#: Built-in formats. ``csv`` and ``parquet`` need a schema; ``libfm`` reads ``label idx:val ...``
#: lines whose j-th token is field ``f<j>`` (one-hot: the value is ignored).
FORMATS: dict[str, Schema | None] = {
    "criteo": _criteo_schema(),
    "avazu": _avazu_schema(),
    "movielens": _movielens_schema(),
    "csv": None,
    "libfm": None,
    "parquet": None,
}


@dataclass
class TabularData:
    """A parsed file as random-access batches.

    Attributes:
        sparse: field -> uint64 (N,) keys.
        dense: float32 (N, n_dense).
        label: float32 (N,) in {0, 1}.
        skipped: malformed lines dropped under ``on_error="skip"``.
    """

    path: Path
    batch_size: int
    sparse: dict[str, np.ndarray]
    dense: np.ndarray
    label: np.ndarray
    dense_fields: list[str]
    skipped: int = 0
    sparse_fields: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.sparse_fields = list(self.sparse)

    @property
    def n(self) -> int:
        return len(self.label)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def batch(self, index: int) -> Batch:
        """Batch ``index``; epoch ``index // batches_per_epoch``, wrapping around the file."""
        start = (index % self.batches_per_epoch) * self.batch_size
        sl = slice(start, min(start + self.batch_size, self.n))
        return Batch({f: k[sl] for f, k in self.sparse.items()}, self.dense[sl], self.label[sl])

    def take(self, rows: np.ndarray) -> TabularData:
        """A new dataset of the given rows (int64 indices), e.g. a train/eval split."""
        return TabularData(self.path, self.batch_size, {f: k[rows] for f, k in self.sparse.items()},
                           self.dense[rows], self.label[rows], list(self.dense_fields))


def read_dataset(path: str | os.PathLike[str], fmt: str = "criteo", batch_size: int = 4096,
                 schema: Schema | None = None) -> TabularData:
    """Parse a file of format ``fmt`` (see :data:`FORMATS`).

    Args:
        path: the file; ``.gz`` is decompressed on the fly.
        fmt: a key of :data:`FORMATS`.
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
        from .libfm import libfm_lines  # (it builds on this module)

        return libfm_lines(p, _lines(p), batch_size, schema.on_error if schema else OnError.RAISE)
    schema = schema or FORMATS[fmt]
    if schema is None:
        raise ValueError(f"format {fmt!r} needs a schema (columns, label, dense, sparse): give one in the config file")
    if fmt == "parquet":
        return _read_parquet(p, batch_size, schema)
    return _read_delimited(p, batch_size, schema)


def CriteoTSV(path: str | os.PathLike[str], batch_size: int = 4096) -> TabularData:  # noqa: N802 (kept name)
    """A Criteo-format file (label, I1..I13, C1..C26, tab-separated; plain or gzip)."""
    return read_dataset(path, "criteo", batch_size)


# ------------------------------------------------------------------ readers
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a text file, gzip or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="\n")  # -sig: a leading BOM is not data
            for lineno, line in enumerate(text, 1):
                yield lineno, line.rstrip("\r\n")
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}:{lineno + 1}: unreadable after {lineno} lines "
                         f"(truncated or corrupt file?): {e}") from e


class _Rows:
    """Collects good lines and handles bad ones by the schema's policy."""

    def __init__(self, path: Path, policy: OnError) -> None:
        self.path, self.policy = path, policy
        self.lines: list[int] = []
        self.skipped = 0

    def bad(self, lineno: int, why: str) -> None:
        if self.policy is OnError.RAISE:
            raise ValueError(f"{self.path}:{lineno}: {why}")
        self.skipped += 1
        if self.skipped <= 5:
            log.warning("%s:%d: skipped: %s", self.path, lineno, why)


def _read_delimited(path: Path, batch_size: int, s: Schema) -> TabularData:
    return delimited_lines(path, _lines(path), batch_size, s)


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


def _empty(path: Path, batch_size: int, s: Schema, skipped: int) -> TabularData:
    dense_fields = list(s.dense) if s.dense_mode in (DenseMode.LOG1P, DenseMode.BOTH) else []
    sparse = {c: np.zeros(0, np.uint64) for c in s.sparse}
    if s.dense_mode in (DenseMode.BUCKETIZE, DenseMode.BOTH):
        sparse.update({c: np.zeros(0, np.uint64) for c in s.dense})
    return TabularData(path, batch_size, sparse, np.zeros((0, len(dense_fields)), np.float32), np.zeros(0, np.float32),
                       dense_fields, skipped)


def _assemble(path: Path, batch_size: int, s: Schema, cols: dict[str, Any], rows: _Rows,
              allow_empty: bool = False) -> TabularData:
    """Convert raw column values (lists, or int64 arrays for parquet int ids); bad values drop
    their row (skip) or raise (raise)."""
    n = len(cols[s.label])
    keep = np.ones(n, dtype=bool)
    lines = np.asarray(rows.lines if rows.lines else np.arange(1, n + 1), dtype=np.int64)

    def mark(bad: np.ndarray, why: str, values: list[Any]) -> None:
        for i in np.nonzero(bad & keep)[0]:
            rows.bad(int(lines[i]), why.format(v=values[i]))
        keep[bad] = False

    raw_label = _floats(cols[s.label])
    mark(np.isnan(raw_label), "label {v!r} is not a number", cols[s.label])
    if s.label_threshold is not None:
        label = (raw_label >= s.label_threshold).astype(np.float32)
    else:
        mark(~np.isin(raw_label, (0.0, 1.0)) & ~np.isnan(raw_label), "label {v!r} is not 0 or 1", cols[s.label])
        label = raw_label.astype(np.float32)
    dense = np.zeros((n, len(s.dense)), dtype=np.float64)
    for j, c in enumerate(s.dense):
        v = _floats(cols[c])
        mark(np.isnan(v) & ~_is_missing(cols[c]), f"{c} value {{v!r}} is not a number", cols[c])
        dense[:, j] = v
    ints: dict[str, np.ndarray] = {}
    for c in s.int_sparse:
        v, bad = _int64s(cols[c])
        mark(bad, f"{c} value {{v!r}} is not an int64 id", cols[c])
        ints[c] = v
    idx = np.nonzero(keep)[0]
    sparse: dict[str, np.ndarray] = {}
    for c in s.sparse:
        if c in ints:
            sparse[c] = hash_feature(c, ints[c][idx])
        else:
            vals = cols[c] if len(idx) == n else [cols[c][i] for i in idx]
            if any(v is None for v in vals):  # parquet nulls: the field's "missing" key
                vals = ["" if v is None else v for v in vals]
            sparse[c] = hash_feature(c, [v if isinstance(v, str) else str(v) for v in vals])
    dense = dense[idx]
    dense_fields: list[str] = []
    out_dense = np.zeros((len(idx), 0), dtype=np.float32)
    if s.dense and s.dense_mode in (DenseMode.BUCKETIZE, DenseMode.BOTH):
        for j, c in enumerate(s.dense):
            sparse[c] = hash_feature(c, _buckets(dense[:, j]))
    if s.dense and s.dense_mode in (DenseMode.LOG1P, DenseMode.BOTH):
        out_dense = np.log1p(np.maximum(np.nan_to_num(dense, nan=0.0), 0.0)).astype(np.float32)
        dense_fields = list(s.dense)
    if len(idx) == 0:
        if allow_empty:
            return _empty(path, batch_size, s, rows.skipped)
        raise ValueError(f"{path} holds no valid rows ({rows.skipped} malformed lines skipped)")
    if rows.skipped and not allow_empty:
        log.warning("%s: %d malformed lines skipped", path, rows.skipped)
    return TabularData(path, batch_size, sparse, out_dense, label[idx], dense_fields, rows.skipped)


def _is_missing(values: list[Any]) -> np.ndarray:
    return np.fromiter((v is None or v == "" for v in values), dtype=bool, count=len(values))


def _floats(values: list[Any]) -> np.ndarray:
    """float64 (N,); empty or unparsable values are NaN (the caller tells them apart)."""
    try:
        return np.array([v if v not in ("", None) else "nan" for v in values], dtype=np.float64)
    except ValueError:
        return np.array([_float_or_nan(v) for v in values], dtype=np.float64)


def _float_or_nan(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _int64s(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """int64 (N,) ids and a bool (N,) mask of values that are not int64s."""
    try:
        return np.array(values, dtype=np.int64), np.zeros(len(values), dtype=bool)
    except (ValueError, OverflowError, TypeError):
        out = np.zeros(len(values), dtype=np.int64)
        bad = np.zeros(len(values), dtype=bool)
        for i, v in enumerate(values):  # error path only
            try:
                x = int(v)
                if not -(2**63) <= x < 2**63:
                    raise OverflowError
                out[i] = x
            except (TypeError, ValueError, OverflowError):
                bad[i] = True
        return out, bad


def _buckets(x: np.ndarray) -> np.ndarray:
    """int64 buckets of float64 (N,) counts: ``floor(log(x)^2)`` above 2, ``floor(x)`` below, missing apart."""
    missing = np.isnan(x)
    safe = np.where(missing, 0.0, x)
    big = safe > 2.0
    b = np.where(big, np.floor(np.log(np.where(big, safe, 1.0)) ** 2), np.floor(safe))
    b = np.clip(b, -(2**62), 2**62).astype(np.int64)
    b[missing] = np.iinfo(np.int64).min  # a bucket of its own
    return b


def _read_parquet(path: Path, batch_size: int, s: Schema) -> TabularData:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet needs pyarrow: pip install 'damo-hybrid[data]'") from e
    want = [s.label, *s.dense, *s.sparse]
    try:
        table = pq.read_table(path, columns=want)
    except Exception as e:  # pyarrow raises several types for a bad file or missing column
        raise ValueError(f"{path}: cannot read columns {want} as parquet: {e}") from e
    return parquet_table(path, table, batch_size, s)


def parquet_table(path: Path, table: Any, batch_size: int, s: Schema, allow_empty: bool = False,
                  first_row: int = 0) -> TabularData:
    """Convert an Arrow table of a parquet file's schema columns (the whole file, or one row group
    of a stream, whose first row is row ``first_row + 1`` of the file in errors): integer id
    columns without nulls are hashed as ints, others as strings."""
    want = [s.label, *s.dense, *s.sparse]
    cols: dict[str, Any] = {}
    ints: set[str] = set()
    for c in want:
        col = table.column(c)
        if c in s.sparse and _is_int_type(col.type) and col.null_count == 0:
            # integer ids stay one int64 array and are hashed as ints, as a CSV's int_sparse columns
            cols[c] = col.to_numpy().astype(np.int64, copy=False)
            ints.add(c)
        else:
            cols[c] = col.to_pylist()
    schema = replace(s, int_sparse=tuple(c for c in s.sparse if c in ints or c in s.int_sparse))
    rows = _Rows(path, s.on_error)
    rows.lines = list(range(first_row + 1, first_row + table.num_rows + 1))
    return _assemble(path, batch_size, schema, cols, rows, allow_empty)


def _is_int_type(t: Any) -> bool:
    import pyarrow.types as pat

    return bool(pat.is_integer(t))

