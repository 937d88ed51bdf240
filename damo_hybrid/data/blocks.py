"""Parsed rows between reading and batching: a block of rows, where a stream resumes
(:class:`Position`), which rows a held-out split keeps (:class:`Holdout`), and the schema's label
and dense rules applied to freshly parsed columns (:func:`finish_block`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..keys.hashing import hash_feature, mix64
from .schema import DenseMode, Schema
from .synthetic import Batch
from .tabular import _buckets

__all__ = ["Block", "Holdout", "Position", "finish_block", "strip_header", "to_batch"]

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Position:
    """Where a stream resumes: ``row`` rows into the block at byte ``offset`` (line ``line``) of
    file ``file``, whose earlier blocks held ``rows`` rows (the ordinal the held-out split hashes)."""

    file: int = 0
    offset: int = 0
    line: int = 1
    row: int = 0
    rows: int = 0
    window: int = 0  # with a shuffle buffer: the window that starts here, and its rows already used
    taken: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"file": self.file, "offset": self.offset, "line": self.line, "row": self.row, "rows": self.rows,
                "window": self.window, "taken": self.taken}


@dataclass(frozen=True)
class Holdout:
    """A held-out share of a stream's rows, picked by a stable hash of (seed, file, row ordinal):
    no second pass, and the training side (``held_out=False``) never sees a held-out row."""

    fraction: float
    held_out: bool
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"the held-out fraction must be in (0, 1), got {self.fraction}")

    def keep(self, file: int, first: int, n: int, top: int = 0) -> np.ndarray:
        """bool (n,): which of rows ``first .. first + n - 1`` of file ``file`` this side keeps;
        ``top``: the byte where the stream's part of the file starts, whose rows it counts (a run
        split by byte range over ranks, where the rows before it are not counted)."""
        ordinal = (np.uint64(file) << np.uint64(40)) + np.arange(first, first + n, dtype=np.uint64)
        salt = mix64(np.uint64(self.seed))[0]
        if top:
            salt ^= mix64(np.uint64(top) | np.uint64(1 << 63))[0]
        h = mix64(ordinal ^ salt)
        held = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < self.fraction
        return held if self.held_out else ~held


@dataclass
class Block:
    """Parsed rows of one block."""

    sparse: dict[str, np.ndarray]
    dense: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def take(self, sl: slice | np.ndarray) -> Block:
        return Block({f: k[sl] for f, k in self.sparse.items()}, self.dense[sl], self.label[sl])

    @staticmethod
    def concat(parts: list[Block]) -> Block:
        if len(parts) == 1:
            return parts[0]
        return Block({f: np.concatenate([p.sparse[f] for p in parts]) for f in parts[0].sparse},
                      np.concatenate([p.dense for p in parts]), np.concatenate([p.label for p in parts]))


def finish_block(s: Schema, label: np.ndarray, dense: np.ndarray, sparse: dict[str, np.ndarray]) -> Block | None:
    """A block from raw float64 labels (N,), dense values (N, D) (NaN: missing) and the sparse
    columns' keys: the schema's label rule and dense transforms applied; None if a label breaks
    the rule (the line reader then names the line)."""
    if s.label_threshold is not None:
        label = (label >= s.label_threshold).astype(np.float32)
    elif not np.isin(label, (0.0, 1.0)).all():
        return None
    if s.dense and s.dense_mode in (DenseMode.BUCKETIZE, DenseMode.BOTH):
        for j, c in enumerate(s.dense):
            sparse[c] = hash_feature(c, _buckets(dense[:, j]))
    out = np.zeros((len(label), 0), np.float32)
    if s.dense and s.dense_mode in (DenseMode.LOG1P, DenseMode.BOTH):
        out = np.log1p(np.maximum(np.nan_to_num(dense, nan=0.0), 0.0)).astype(np.float32)
    return Block(sparse, out, label.astype(np.float32))


def strip_header(raw: bytes, s: Schema, file_start: bool) -> bytes:
    """A block without a file's BOM and header line."""
    if not file_start:
        return raw
    body = raw[len(_BOM):] if raw.startswith(_BOM) else raw
    end = body.find(b"\n")
    head = body[:end if end >= 0 else len(body)].rstrip(b"\r")
    if s.header or (s.header is None and head.decode("utf-8", "replace").split(s.sep) == list(s.columns)):
        return body[end + 1:] if end >= 0 else b""
    return body


def to_batch(parts: list[Block]) -> Batch:
    """One batch of consecutive blocks' rows (its own dict of keys: a block's may be reused)."""
    b = Block.concat(parts)
    return Batch(dict(b.sparse), b.dense, b.label)
