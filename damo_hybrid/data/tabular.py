"""A parsed file as random-access batches (:class:`TabularData`), and the conversion every file
reader shares: raw column values -> per-field uint64 keys
(:func:`~damo_hybrid.keys.hashing.hash_feature`, salted by the field name), float32 dense
features and float32 labels, bad rows raised or dropped by the schema's :class:`OnError`.

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

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import clip
from ..keys.hashing import hash_feature
from .schema import DenseMode, OnError, Schema
from .synthetic import Batch

__all__ = ["TabularData"]

log = logging.getLogger(__name__)


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
            v = values[i].item() if isinstance(values[i], np.generic) else values[i]  # 7.5, not np.float64(7.5)
            rows.bad(int(lines[i]), why.format(v=clip(v)))  # a value is quoted clipped: it may be huge
        keep[bad] = False

    raw_label = _floats(cols[s.label])
    mark(np.isnan(raw_label), "label {v} is not a number", cols[s.label])
    if s.label_threshold is not None:
        label = (raw_label >= s.label_threshold).astype(np.float32)
    else:
        mark(~np.isin(raw_label, (0.0, 1.0)) & ~np.isnan(raw_label), "label {v} is not 0 or 1", cols[s.label])
        label = raw_label.astype(np.float32)
    dense = np.zeros((n, len(s.dense)), dtype=np.float64)
    for j, c in enumerate(s.dense):
        v = _floats(cols[c])
        mark(np.isnan(v) & ~_is_missing(cols[c]), f"{c} value {{v}} is not a number", cols[c])
        dense[:, j] = v
    ints: dict[str, np.ndarray] = {}
    for c in s.int_sparse:
        v, bad = _int64s(cols[c])
        mark(bad, f"{c} value {{v}} is not an int64 id", cols[c])
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
        raise ValueError(f"{path} holds no rows" + (f" ({rows.skipped} malformed lines skipped)" if rows.skipped else ""))
    if rows.skipped and not allow_empty:
        log.warning("%s: %d malformed lines skipped", path, rows.skipped)
    return TabularData(path, batch_size, sparse, out_dense, label[idx], dense_fields, rows.skipped)


def _is_missing(values: list[Any]) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return np.zeros(len(values), dtype=bool)
    return np.fromiter((v is None or v == "" for v in values), dtype=bool, count=len(values))


def _floats(values: list[Any]) -> np.ndarray:
    """float64 (N,); empty, unparsable or non-finite values are NaN (the caller tells them apart):
    ``inf`` is no more a feature value or a label than ``--lr inf`` is an option."""
    if isinstance(values, np.ndarray):
        v = values.astype(np.float64)
    else:
        try:
            v = np.array([x if x not in ("", None) else "nan" for x in values], dtype=np.float64)
        except ValueError:
            return np.array([_float_or_nan(x) for x in values], dtype=np.float64)
    v[~np.isfinite(v)] = np.nan
    return v


def _float_or_nan(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _int64s(values: list[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 (N,) ids and a bool (N,) mask of values that are not int64 ids.

    An id is an int, integer text (``int()``'s rule, as the command line's), or a float equal to
    an integer in the int64 range (a parquet float column: ``7.0`` is the id 7). Never a bool, a
    fractional float (``7.5`` is refused, not truncated), NaN, or text such as ``"7.5"``.
    """
    n = len(values)
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False), np.zeros(n, dtype=bool)
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        v = values.astype(np.float64, copy=False)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(v) & (v == np.trunc(v)) & (v >= -(2.0**63)) & (v < 2.0**63)
        return np.where(ok, v, 0.0).astype(np.int64), ~ok
    kinds = set(map(type, values))
    if kinds <= {str} or kinds <= {int}:  # numpy converts these exactly, or raises
        try:
            return np.array(values, dtype=np.int64), np.zeros(n, dtype=bool)
        except (ValueError, OverflowError, TypeError):
            pass
    out = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    for i, v in enumerate(values):  # the error path, or a column of mixed types
        try:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, str, float, np.integer, np.floating)):
                raise TypeError
            if isinstance(v, (float, np.floating)) and not (math.isfinite(v) and v == int(v)):
                raise ValueError
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
