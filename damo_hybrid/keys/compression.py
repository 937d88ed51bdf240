"""Compositional embeddings: a feature's raw keys -> the keys of the stored rows it combines.

A table with a :class:`CompressionConfig` stores far fewer rows than it has ids. Each raw key is
first reduced to an id ``i = key mod rows`` (the hashing trick; exact where ids are below
``rows``), and ``i`` is then addressed by ``P`` partition keys whose rows the worker combines:

- ``qr`` (Shi et al., KDD 2020, the quotient-remainder trick generalised to ``k`` complementary
  partitions): the mixed-radix digits of ``i``: ``i mod m``, ``(i div m) mod m``, ...,
  ``i div m**(k-1)``. Partitions of ``m, m, ..., ceil(rows / m**(k-1))`` rows; every id keeps a
  unique combination. Combined by ``op``: element-wise ``mult`` or ``add``, or ``concat``.
- ``binary_code`` (Yan et al., CIKM 2021): ``i`` written in ``ceil(log2 rows)`` bits, cut into
  blocks of ``bits_per_block`` bits from the least significant; block ``j``'s value indexes its own
  ``2**bits_per_block`` rows. Fused by ``sum``, ``mean`` or ``concat``.
- ``hashing``: the plain hashing trick, one partition of ``rows`` rows (the baseline the others
  are compared against at equal bytes).
- ``double_hash`` (Zhang et al., RecSys 2020): frequent keys, those seen ``min_count`` times (the
  table's admission counters count raw keys), keep a row of their own; the others take the mean
  of two rows of a shared partition of ``rows`` rows, addressed by two independent hashes. Both
  partition keys of a frequent key are its own row, so the mean is that row exactly.

Partition ``p``'s row for index ``x`` is stored under the key ``p << 56 | x``. Everything after
this transform (de-duplication, caches, prefetch, write-back, checkpoints) sees ordinary keys.
Pure functions of the keys: safe from any thread, and the same in the loader and host-manager
stages, so a pipelined run equals the sequential one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import clip as _clip
from ..checks import int_at_least
from .hashing import mix64

__all__ = ["CompressionKind", "CompressionConfig", "PART_SHIFT"]

PART_SHIFT = 56  # a stored key: partition << PART_SHIFT | index within the partition
_MAX_ROWS = 1 << PART_SHIFT
_OPS = {"qr": ("mult", "add", "concat"), "binary_code": ("sum", "mean", "concat"), "hashing": ("sum",),
        "double_hash": ("mean",)}
_SALT = np.uint64(0x9E3779B97F4A7C15)


class CompressionKind(str, enum.Enum):
    QR = "qr"
    BINARY_CODE = "binary_code"
    HASHING = "hashing"
    DOUBLE_HASH = "double_hash"


@dataclass(frozen=True)
class CompressionConfig:
    """How a table's raw keys map to the fewer rows it stores (see the module doc).

    Build it with :meth:`qr`, :meth:`binary_code`, :meth:`hashing` or :meth:`double_hash`.

    Attributes:
        kind: the method.
        rows: the id space the raw keys are reduced to (``key mod rows``): the rows a full table
            would hold.
        op: how the partitions' rows combine: ``mult``, ``add`` or ``concat`` (qr); ``sum``,
            ``mean`` or ``concat`` (binary_code); ``sum`` (hashing, one partition).
        m: qr: rows of each partition but the last.
        partitions: qr: the number of complementary partitions ``k`` (2 or more).
        bits_per_block: binary_code: bits of the id each block takes.
        min_count: double_hash: the occurrences from which a key has a row of its own.
    """

    kind: CompressionKind
    rows: int
    op: str = "sum"
    m: int = 0
    partitions: int = 1
    bits_per_block: int = 0
    min_count: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", CompressionKind(self.kind))
        for n in ("rows", "m", "partitions", "bits_per_block", "min_count"):
            int_at_least(f"compression {n}", getattr(self, n), 0)
        if not 2 <= self.rows <= _MAX_ROWS:
            raise ValueError(f"compression rows must be in [2, 2**{PART_SHIFT}], got {self.rows}")
        kind = self.kind.value
        if self.op not in _OPS[kind]:
            raise ValueError(f"{kind} combines its partitions by one of {list(_OPS[kind])}, got op={_clip(self.op)}")
        used = {"qr": ("m", "partitions"), "binary_code": ("bits_per_block",), "double_hash": ("min_count",),
                "hashing": ()}[kind]
        unused = [n for n, default in (("m", 0), ("partitions", 1), ("bits_per_block", 0), ("min_count", 0))
                  if n not in used and getattr(self, n) != default]
        if unused:  # (a stored config compares equal to the same mapping written again)
            raise ValueError(f"{kind} does not take {unused}")
        if self.kind is CompressionKind.QR:
            if not 2 <= self.partitions <= 255:
                raise ValueError(f"qr needs 2 <= partitions <= 255, got {self.partitions}")
            if self.m < 2 or self.m ** (self.partitions - 1) >= self.rows:
                raise ValueError(f"qr needs 2 <= m and m**(partitions - 1) < rows, got m={self.m}, "
                                 f"partitions={self.partitions}, rows={self.rows}: lower m or partitions")
        elif self.kind is CompressionKind.BINARY_CODE:
            bits = self.code_bits
            if not 1 <= self.bits_per_block <= min(bits, 24):
                raise ValueError(f"binary_code needs 1 <= bits_per_block <= min({bits} code bits, 24), "
                                 f"got {self.bits_per_block}")
        elif self.kind is CompressionKind.DOUBLE_HASH and not 1 <= self.min_count <= 255:
            raise ValueError(f"double_hash takes min_count in [1, 255], got {self.min_count}")
        if self.parts > 255:
            raise ValueError(f"at most 255 partitions, got {self.parts}")

    # ------------------------------------------------------------------ builders
    @classmethod
    def double_hash(cls, rows: int, min_count: int) -> CompressionConfig:
        """Frequency-based double hashing: keys seen ``min_count`` times keep their own rows, the
        others share ``rows`` rows through two hashes."""
        return cls(CompressionKind.DOUBLE_HASH, rows, op="mean", min_count=min_count)

    @classmethod
    def qr(cls, rows: int, m: int, op: str = "mult", partitions: int = 2) -> CompressionConfig:
        """Quotient-remainder (``k`` complementary partitions): ``O(k * m + rows / m**(k-1))`` rows."""
        return cls(CompressionKind.QR, rows, op=op, m=m, partitions=partitions)

    @classmethod
    def binary_code(cls, rows: int, bits_per_block: int, op: str = "sum") -> CompressionConfig:
        """Binary-code blocks: ``ceil(log2 rows) / bits_per_block`` blocks of ``2**bits_per_block`` rows."""
        return cls(CompressionKind.BINARY_CODE, rows, op=op, bits_per_block=bits_per_block)

    @classmethod
    def hashing(cls, rows: int) -> CompressionConfig:
        """The plain hashing trick: ``key mod rows``, ``rows`` rows shared by colliding keys."""
        return cls(CompressionKind.HASHING, rows)

    @classmethod
    def parse(cls, spec: str) -> CompressionConfig:
        """From ``kind:name=value,...``, the command line's and the TOML config's form, e.g.
        ``qr:rows=10000000,m=4000,op=mult``, ``binary_code:rows=10000000,bits_per_block=8``,
        ``hashing:rows=1000000``.

        Raises:
            ValueError: an unknown kind or name, a value that is not an int, or a bad config.
        """
        if not isinstance(spec, str):
            raise TypeError(f"a compression spec must be a string such as 'qr:rows=1000000,m=1000', "
                            f"got {type(spec).__name__}")
        kind, _, rest = spec.partition(":")
        names = {"qr": ("rows", "m", "op", "partitions"), "binary_code": ("rows", "bits_per_block", "op"),
                 "hashing": ("rows",), "double_hash": ("rows", "min_count")}
        at = _clip(spec, 60)  # a spec quoted in an error: it may come from a file, and be huge
        if kind not in names:
            raise ValueError(f"unknown compression {_clip(kind)} in {at}; known: {', '.join(names)}")
        given: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            name, eq, value = (x.strip() for x in item.partition("="))
            if name in given:
                raise ValueError(f"{_clip(name)}= given twice in {at}")
            if not eq or name not in names[kind]:
                raise ValueError(f"{kind} takes {', '.join(n + '=' for n in names[kind])}; got {_clip(item)} in {at}")
            try:
                given[name] = value if name == "op" else int(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {_clip(value)} in {at}") from None
        if "rows" not in given:
            raise ValueError(f"{at} lacks rows= (the id space its keys are reduced to)")
        if kind == "qr" and "m" not in given:
            raise ValueError(f"{at} lacks m= (the rows of the remainder partition)")
        if kind == "binary_code" and "bits_per_block" not in given:
            raise ValueError(f"{at} lacks bits_per_block=")
        if kind == "double_hash" and "min_count" not in given:
            raise ValueError(f"{at} lacks min_count= (the occurrences from which a key has its own row)")
        return getattr(cls, kind)(**given)

    # ------------------------------------------------------------------ shape
    @property
    def code_bits(self) -> int:
        """Bits of the largest id (binary_code)."""
        return (self.rows - 1).bit_length()  # ids 0 .. rows - 1 (exact: no float log2)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows of each partition."""
        if self.kind is CompressionKind.QR:
            return (self.m,) * (self.partitions - 1) + (-(-self.rows // self.m ** (self.partitions - 1)),)
        if self.kind is CompressionKind.BINARY_CODE:
            bits, b = self.code_bits, self.bits_per_block
            return tuple(1 << min(b, bits - j) for j in range(0, bits, b))
        if self.kind is CompressionKind.DOUBLE_HASH:  # the shared partition (frequent keys' own rows come on top)
            return (0, self.rows, self.rows)
        return (self.rows,)

    @property
    def parts(self) -> int:
        """``P``: stored rows combined per key."""
        if self.kind is CompressionKind.QR:
            return self.partitions
        if self.kind is CompressionKind.BINARY_CODE:
            return -(-self.code_bits // self.bits_per_block)
        return 2 if self.kind is CompressionKind.DOUBLE_HASH else 1

    @property
    def stored_rows(self) -> int:
        """The most rows the table can hold (the sum of the partitions)."""
        return sum(self.sizes)

    def out_dim(self, dim: int, linear_column: bool = False) -> int:
        """Width of a key's combined row, for a table of row width ``dim``: ``P * dim`` by
        ``concat``, else ``dim``; with ``linear_column`` the first-order column is summed, not
        concatenated (``P * (dim - 1) + 1``)."""
        if self.op != "concat":
            return dim
        return self.parts * (dim - 1) + 1 if linear_column else self.parts * dim

    # ------------------------------------------------------------------ transform
    def subkeys(self, keys: np.ndarray, frequent: np.ndarray | None = None) -> np.ndarray:
        """The stored keys each raw key combines.

        Args:
            keys: uint64 (N,) raw keys.
            frequent: double_hash only: bool (N,) the keys with rows of their own.
        Returns:
            uint64 (N, P): partition ``p``'s key in column ``p``.
        Raises:
            ValueError: double_hash without ``frequent``.
        """
        if self.kind is CompressionKind.DOUBLE_HASH:
            return self._double_hash(np.asarray(keys, dtype=np.uint64), frequent)
        i = np.asarray(keys, dtype=np.uint64) % np.uint64(self.rows)
        out = np.empty((len(i), self.parts), np.uint64)
        if self.kind is CompressionKind.QR:
            m = np.uint64(self.m)
            for p in range(self.parts - 1):
                out[:, p] = i % m
                i = i // m
            out[:, -1] = i
        elif self.kind is CompressionKind.BINARY_CODE:
            b = self.bits_per_block
            mask = np.uint64((1 << b) - 1)
            for p in range(self.parts):
                out[:, p] = (i >> np.uint64(p * b)) & mask
        else:
            out[:, 0] = i
        out |= np.arange(self.parts, dtype=np.uint64) << np.uint64(PART_SHIFT)
        return out

    def _double_hash(self, keys: np.ndarray, frequent: np.ndarray | None) -> np.ndarray:
        """Own rows ``(0 << 56 | key mod 2**56)`` twice, or two shared rows (partitions 1 and 2)."""
        if frequent is None or len(frequent) != len(keys):
            raise ValueError("double_hash partition keys depend on which keys are frequent: give frequent, bool (N,)")
        rows = np.uint64(self.rows)
        own = self.own_keys(keys)
        out = np.empty((len(keys), 2), np.uint64)
        out[:, 0] = mix64(keys) % rows | np.uint64(1 << PART_SHIFT)
        out[:, 1] = mix64(keys ^ _SALT) % rows | np.uint64(2 << PART_SHIFT)
        out[frequent] = own[frequent, None]
        return out

    def own_keys(self, keys: np.ndarray) -> np.ndarray:
        """double_hash: the key of each raw key's own row (whether or not it has one)."""
        return np.asarray(keys, dtype=np.uint64) & np.uint64(_MAX_ROWS - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "rows": self.rows, "op": self.op, "m": self.m,
                "partitions": self.partitions, "bits_per_block": self.bits_per_block, "min_count": self.min_count}

    def describe(self) -> str:
        """A one-line summary (``inspect``)."""
        detail = {CompressionKind.QR: f"m={self.m}, partitions={self.partitions}",
                  CompressionKind.BINARY_CODE: f"bits_per_block={self.bits_per_block}",
                  CompressionKind.HASHING: "", CompressionKind.DOUBLE_HASH: f"min_count={self.min_count}"}[self.kind]
        if self.kind is CompressionKind.DOUBLE_HASH:
            return f"double_hash({detail}, op=mean): own rows of frequent keys + 2 x {self.rows:,} shared rows"
        return (f"{self.kind.value}({detail + ', ' if detail else ''}op={self.op}) of {self.rows:,} ids: "
                f"{self.parts} x rows of {self.stored_rows:,} ({self.rows / self.stored_rows:,.1f}x fewer)")
