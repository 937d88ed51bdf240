"""The stored row format: one value per key holding weights, state and metadata.

A row is a little-endian array of ``6 + W + state`` uint32 words:

====  ==========================================================
word  meaning
====  ==========================================================
0     layout version (low byte, currently 1); the weight format in bits 8..15 (0 float32,
      1 float16, 2 bfloat16, 3 int16: see :mod:`~damo_hybrid.precision`); other bits 0
1     ``F = dim + state``, the number of values that follow the header
2     update count (saturates at 2**32 - 1)
3     creation time, unix seconds
4     last-update time, unix seconds
5..   ``W`` words of weights: ``dim`` float32 (``W = dim``), or ``dim`` 16-bit values two
      to a word, low half first, a last odd half zero (``W = ceil(dim / 2)``); then
      ``state`` float32 optimizer state
last  checksum
====  ==========================================================

The checksum is a multilinear hash of words ``0 .. 5+F-1`` with odd 64-bit
multipliers (so any change of one word changes the sum), xored with
``mix64(key)`` (so a value stored under the wrong key is caught too), passed
through ``mix64`` and cut to its low 32 bits. It is computed for a whole batch
with numpy, with no per-row Python.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import compress, repeat

import numba
import numpy as np

from ..errors import CorruptRowError
from ..keys.hashing import mix64
from ..keys.kernels import mix
from ..precision import CODES, RowDtype, RowPrecision

__all__ = ["LAYOUT_VERSION", "HEADER_WORDS", "Rows", "RowCodec"]

LAYOUT_VERSION = 1
HEADER_WORDS = 5
_U32_MAX = np.uint64(0xFFFFFFFF)


@dataclass
class Rows:
    """Decoded rows of one table, aligned with a key batch.

    Attributes:
        weights: float32 (N, dim).
        state: float32 (N, state_width).
        count: int64 (N,) update counts.
        created: int64 (N,) unix seconds.
        updated: int64 (N,) unix seconds.
    """

    weights: np.ndarray
    state: np.ndarray
    count: np.ndarray
    created: np.ndarray
    updated: np.ndarray

    @classmethod
    def empty(cls, n: int, dim: int, state_width: int) -> Rows:
        """``n`` rows to fill with :meth:`put`: weights and state uninitialised, metadata zero."""
        return cls(np.empty((n, dim), np.float32), np.empty((n, state_width), np.float32),
                   np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64))

    def __len__(self) -> int:
        return len(self.count)

    def take(self, idx: np.ndarray) -> Rows:
        """The rows at ``idx``: int positions or a bool mask (copied), or a slice (views)."""
        return Rows(self.weights[idx], self.state[idx], self.count[idx], self.created[idx], self.updated[idx])

    def put(self, idx: np.ndarray, rows: Rows) -> None:
        """``self[idx] = rows`` field by field (``idx``: int positions or a bool mask)."""
        self.weights[idx], self.state[idx] = rows.weights, rows.state
        self.count[idx], self.created[idx], self.updated[idx] = rows.count, rows.created, rows.updated


class RowCodec:
    """Encodes and decodes the rows of one table.

    Args:
        table: table name, for error messages.
        dim: weight width.
        state_width: optimizer-state width.
        precision: the weights' format (default float32).
    """

    def __init__(self, table: str, dim: int, state_width: int, precision: RowPrecision | None = None) -> None:
        self.table = table
        self.dim = dim
        self.state_width = state_width
        self.prec = precision or RowPrecision(RowDtype.FLOAT32)
        self.nfloats = dim + state_width
        self.wwords = dim if self.prec.exact else (dim + 1) // 2
        self.head = LAYOUT_VERSION | self.prec.code << 8
        self.words = HEADER_WORDS + self.wwords + state_width + 1
        self.nbytes = 4 * self.words
        self._void = np.dtype((np.void, self.nbytes))
        # odd multipliers, one per checksummed word
        self._mult = mix64(np.arange(1, self.words, dtype=np.uint64)) | np.uint64(1)

    def _checksum(self, keys: np.ndarray, words: np.ndarray) -> np.ndarray:
        """uint32 (N,): ``mix64(sum_j words[:, j] * mult[j] ^ mix64(key))`` over every word but the
        last (wrapping uint64 arithmetic), low 32 bits."""
        out = np.empty(len(keys), dtype=np.uint32)
        _checksum_rows(np.ascontiguousarray(words), np.ascontiguousarray(keys, dtype=np.uint64), self._mult, out)
        return out

    def encode(self, keys: np.ndarray, rows: Rows) -> list[bytes]:
        """Serialise rows.

        Args:
            keys: uint64 (N,).
            rows: N rows.
        Returns:
            N byte strings of ``self.nbytes`` bytes.
        """
        n = len(keys)
        words = np.empty((n, self.words), dtype="<u4")
        words[:, 0] = self.head
        words[:, 1] = self.nfloats
        words[:, 2] = np.minimum(rows.count, 0xFFFFFFFF)
        words[:, 3] = rows.created
        words[:, 4] = rows.updated
        s = HEADER_WORDS + self.wwords
        if self.prec.exact:
            words[:, HEADER_WORDS:s].view("<f4")[:] = rows.weights
        else:
            halves = words[:, HEADER_WORDS:s].view("<u2")
            halves[:, self.dim:] = 0
            halves[:, :self.dim] = self.prec.pack(rows.weights).view("<u2")
        words[:, s:-1].view("<f4")[:] = rows.state
        words[:, -1] = self._checksum(keys, words)
        return words.view(self._void).ravel().tolist()

    def decode(self, keys: np.ndarray, values: list[bytes | None]) -> tuple[Rows, np.ndarray]:
        """Parse and verify stored values.

        Args:
            keys: uint64 (N,) the keys the values were read under.
            values: N values, ``None`` where the key is not stored.
        Returns:
            ``(rows, found)``: rows of the found keys only (M of them, in key
            order) and bool (N,) ``found``.
        Raises:
            CorruptRowError: a value has the wrong length, version, width or
                checksum. It names the table and the key.
        """
        n = len(values)
        found = np.fromiter(map(operator.is_not, values, repeat(None)), dtype=bool, count=n)
        present = list(compress(values, found))
        fkeys = keys[found]
        m = len(present)
        lens = np.fromiter(map(len, present), dtype=np.int64, count=m)
        bad = np.nonzero(lens != self.nbytes)[0]
        if len(bad):
            i = int(bad[0])
            raise CorruptRowError(self.table, int(fkeys[i]), f"value is {lens[i]} bytes, expected {self.nbytes}")
        words = np.frombuffer(b"".join(present), dtype="<u4").reshape(m, self.words)
        ok = (words[:, 0] == self.head) & (words[:, 1] == self.nfloats)
        ok &= words[:, -1] == self._checksum(fkeys, words)
        if not ok.all():
            i = int(np.nonzero(~ok)[0][0])
            w = words[i]
            if w[0] & 0xFF != LAYOUT_VERSION:
                reason = f"layout version {w[0] & 0xFF} is not {LAYOUT_VERSION}"
            elif w[0] != self.head:
                codes = {v: k for k, v in CODES.items()}
                got = codes.get(int(w[0]) >> 8)
                reason = (f"row holds {got.value if got else 'unknown'} weights (code {int(w[0]) >> 8}), "
                          f"table has row_dtype {self.prec.dtype.value}")
            elif w[1] != self.nfloats:
                reason = f"row holds {w[1]} floats, table expects {self.nfloats}"
            else:
                reason = "checksum mismatch"
            raise CorruptRowError(self.table, int(fkeys[i]), reason)
        s = HEADER_WORDS + self.wwords
        if self.prec.exact:
            weights = np.array(words[:, HEADER_WORDS:s].view("<f4"), dtype=np.float32)
        else:
            weights = self.prec.unpack(words[:, HEADER_WORDS:s].view("<u2")[:, :self.dim].view(self.prec.slab_dtype))
        rows = Rows(
            weights=weights,
            state=np.array(words[:, s:-1].view("<f4"), dtype=np.float32),
            count=words[:, 2].astype(np.int64),
            created=words[:, 3].astype(np.int64),
            updated=words[:, 4].astype(np.int64),
        )
        return rows, found


@numba.njit(nogil=True, cache=True)
def _checksum_rows(words, keys, mult, out) -> None:
    for i in range(len(keys)):
        h = np.uint64(0)
        for j in range(len(mult)):
            h += np.uint64(words[i, j]) * mult[j]
        out[i] = np.uint32(mix(h ^ mix(keys[i])) & _U32_MAX)
