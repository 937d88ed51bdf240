"""File datasets: Criteo-format TSV (plain or gzip) parsed into hashed keys and dense arrays.

A file is parsed once, at construction, into per-field uint64 keys
(:func:`~damo_hybrid.hashing.hash_feature`), float32 dense features and labels; batches are
slices of those arrays, so ``batch(i)`` is random-access and a resumed run sees the same data.
Epochs wrap around the file. (Streaming very large files through pyarrow comes with the data
readers of the quality work.)

Criteo rows: ``label``, 13 integer columns ``I1..I13`` (may be empty or negative), 26
categorical columns ``C1..C26`` (8 hex characters, may be empty). Dense values become
``log1p(max(x, 0))``; a missing categorical is the empty string, a key of its own per field.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np

from .hashing import hash_feature
from .synthetic import Batch

__all__ = ["CriteoTSV"]

_N_DENSE, _N_SPARSE = 13, 26


class CriteoTSV:
    """A Criteo-format file as random-access batches.

    Args:
        path: ``.tsv``/``.txt`` or the same gzipped (``.gz``).
        batch_size: samples per batch.
    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line; the message names the file and line.
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 4096) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.sparse_fields = [f"C{i + 1}" for i in range(_N_SPARSE)]
        self.dense_fields = [f"I{i + 1}" for i in range(_N_DENSE)]
        rows = self._read_rows()
        if not rows:
            raise ValueError(f"{self.path} holds no rows")
        cols = list(zip(*rows))
        try:
            self.label = np.array(cols[0], dtype=np.float32)
        except ValueError as e:
            bad = next(i for i, v in enumerate(cols[0]) if not _is_number(v))
            raise ValueError(f"{self.path}:{bad + 1}: label {cols[0][bad]!r} is not a number") from e
        if not np.isin(self.label, (0.0, 1.0)).all():
            bad = int(np.nonzero(~np.isin(self.label, (0.0, 1.0)))[0][0])
            raise ValueError(f"{self.path}:{bad + 1}: label {cols[0][bad]!r} is not 0 or 1")
        dense = np.zeros((len(rows), _N_DENSE), dtype=np.float64)
        for j in range(_N_DENSE):
            col = cols[1 + j]
            try:
                dense[:, j] = np.array([v or "0" for v in col], dtype=np.float64)
            except ValueError as e:
                bad = next(i for i, v in enumerate(col) if v and not _is_number(v))
                raise ValueError(f"{self.path}:{bad + 1}: I{j + 1} value {col[bad]!r} is not a number") from e
        self.dense = np.log1p(np.maximum(dense, 0.0)).astype(np.float32)
        self.sparse = {f: hash_feature(f, list(cols[1 + _N_DENSE + j])) for j, f in enumerate(self.sparse_fields)}
        self.n = len(rows)

    def _read_rows(self) -> list[list[str]]:
        if not self.path.is_file():
            raise FileNotFoundError(f"no data file {self.path}")
        opener = gzip.open if self.path.suffix == ".gz" else open
        rows: list[list[str]] = []
        try:
            with opener(self.path, "rb") as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
                for lineno, line in enumerate(text, 1):
                    parts = line.rstrip("\r\n").split("\t")
                    if len(parts) != 1 + _N_DENSE + _N_SPARSE:
                        if line.strip() == "":
                            continue
                        raise ValueError(f"{self.path}:{lineno}: {len(parts)} columns, expected "
                                         f"{1 + _N_DENSE + _N_SPARSE} (label, I1..I13, C1..C26)")
                    rows.append(parts)
        except (EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: unreadable after {len(rows)} rows ({e})") from e
        return rows

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def batch(self, index: int) -> Batch:
        """Batch ``index``; epoch ``index // batches_per_epoch``, wrapping around the file."""
        start = (index % self.batches_per_epoch) * self.batch_size
        sl = slice(start, min(start + self.batch_size, self.n))
        return Batch({f: k[sl] for f, k in self.sparse.items()}, self.dense[sl], self.label[sl])


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
