"""The columns of an input file: :class:`Schema` (which column is the label, which are dense, which
sparse, and how to treat them), its modes, and the built-in formats with their schemas.

A ``[schema]`` table of a config file arrives here as is; every value is checked for its type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from ..checks import clip, reject_unknown

__all__ = ["DenseMode", "OnError", "Schema", "FORMATS"]


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
        # a TOML [schema] table arrives here as is: every value is checked for its type, never converted
        for name in ("columns", "dense", "sparse", "int_sparse"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or not all(isinstance(c, str) for c in v):
                raise TypeError(f"Schema.{name} must be a sequence of column names, got {clip(v)}")
            object.__setattr__(self, name, tuple(v))
        if not isinstance(self.label, str):
            raise TypeError(f"label must be a column name (a string), got {clip(self.label)}")
        if self.header is not None and not isinstance(self.header, bool):
            raise TypeError(f"header must be true, false or absent, got {clip(self.header)}")
        t = self.label_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise TypeError(f"label_threshold must be a finite number or absent, got {clip(t)}")
        for name, kind in (("dense_mode", DenseMode), ("on_error", OnError)):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in [k.value for k in kind]:
                raise ValueError(f"{name} must be one of {sorted(k.value for k in kind)}, got {clip(v)}")
            object.__setattr__(self, name, kind(v))
        used = [self.label, *self.dense, *self.sparse]
        if len(set(used)) != len(used):
            raise ValueError(f"a column is used twice among label {clip(self.label)}, dense {clip(self.dense)}, "
                             f"sparse {clip(self.sparse)}")
        if self.columns:
            unknown = [c for c in used if c not in self.columns]
            if unknown:
                raise ValueError(f"columns {clip(unknown)} are not among the schema's columns {clip(self.columns)}")
            if len(set(self.columns)) != len(self.columns):
                raise ValueError(f"duplicate column names in {clip(self.columns)}")
        if not set(self.int_sparse) <= set(self.sparse):
            raise ValueError(f"int_sparse {clip(self.int_sparse)} must be a subset of sparse {clip(self.sparse)}")
        if not self.sparse and not self.dense:
            raise ValueError("a schema needs at least one dense or sparse column")
        if not isinstance(self.sep, str) or not self.sep or "\r" in self.sep or "\n" in self.sep:
            raise ValueError(f"sep must be a non-empty delimiter string without a newline, got {clip(self.sep)}")

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
