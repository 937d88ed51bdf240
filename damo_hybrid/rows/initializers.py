"""Deterministic row initialisation.

A row is a pure function of ``(seed, table name, key)``: the same in every
process, after the row was evicted or expired, and on every backend. Each
value comes from a counter-based generator:

- ``base = mix64(mix64(seed ^ fnv1a64(table)) ^ key)`` per row;
- ``bits(c) = mix64(base + (c + 1) * 0x9e3779b97f4a7c15)`` for counter ``c``;
- column ``j`` uses counter ``j``; a uniform in (0, 1) is
  ``((bits >> 40) + 0.5) / 2**24``, exact in float32;
- a normal uses Box-Muller on the two 24-bit halves of one ``bits`` value:
  ``u1 = ((bits >> 40) + 0.5) / 2**24``, ``u2 = (((bits >> 16) & 0xffffff) + 0.5) / 2**24``,
  ``z = sqrt(-2 ln u1) cos(2 pi u2)``, computed in float64 and rounded to float32;
- a truncated normal redraws (with counters shifted by ``dim`` per round)
  values outside ``mean +- 2 std``, up to 8 rounds, then clips (the chance of
  reaching the clip is about 1e-11 per value).

``xavier_uniform`` treats a row as the weight of a one-hot input, so
``fan_in = 1`` and ``fan_out = dim``: ``U(-b, b)`` with ``b = sqrt(6 / (1 + dim))``.

A CUDA twin of this algorithm must give the same rows (none ships today: new rows are
initialised on the host and uploaded with the rest).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..config import InitializerConfig, InitializerKind
from ..keys.hashing import fnv1a64, mix64
from ..keys.kernels import mix

__all__ = ["RowInitializer"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TRUNC_ROUNDS = 8
_INV24 = 1.0 / (1 << 24)
_LOW24 = np.uint64(0xFFFFFF)


class RowInitializer:
    """Initial rows of one table.

    Args:
        config: the table's initializer.
        table: the table name (part of the seed, so equal keys in different
            tables start differently).
        dim: row width.
        zero_last: the last column starts at zero (a table's ``linear_column``).
    """

    def __init__(self, config: InitializerConfig, table: str, dim: int, zero_last: bool = False) -> None:
        self.zero_last = zero_last
        self.kind = config.kind
        self.dim = dim
        self.low, self.high = float(config.low), float(config.high)
        self.mean, self.std = float(config.mean), float(config.std)
        table_salt = fnv1a64([table.encode("utf-8")])[0]
        self.salt = mix64(np.uint64(config.seed) ^ table_salt)[0]
        # (counter + 1) * golden for counters 0 .. rounds * dim - 1
        self._cols = (np.arange(1, _TRUNC_ROUNDS * dim + 1, dtype=np.uint64) * _GOLDEN)

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """Initial rows.

        Args:
            keys: uint64 (N,).
        Returns:
            float32 (N, dim).
        """
        rows = self._draw(keys)
        if self.zero_last:
            rows[:, -1] = 0.0
        return rows

    def _draw(self, keys: np.ndarray) -> np.ndarray:
        n, d = len(keys), self.dim
        if self.kind is InitializerKind.ZEROS:
            return np.zeros((n, d), dtype=np.float32)
        if self.kind is InitializerKind.ONES:
            return np.ones((n, d), dtype=np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty((n, d), dtype=np.float32)
        if self.kind is InitializerKind.UNIFORM:
            _uniform_rows(keys, self.salt, self._cols, self.low, self.high - self.low, out)
        elif self.kind is InitializerKind.XAVIER_UNIFORM:
            b = math.sqrt(6.0 / (1.0 + d))
            _uniform_rows(keys, self.salt, self._cols, -b, 2.0 * b, out)
        else:
            trunc = self.kind is not InitializerKind.NORMAL
            _normal_rows(keys, self.salt, self._cols, self.mean, self.std, _TRUNC_ROUNDS if trunc else 0, out)
        return out


# One compiled loop per row (numba, GIL-free): the documented algorithm above, value by value.

@numba.njit(nogil=True, cache=True, inline="always")
def _u24(bits: np.uint64, shift: int) -> float:
    return (np.float64((bits >> np.uint64(shift)) & _LOW24) + 0.5) * _INV24


@numba.njit(nogil=True, cache=True)
def _uniform_rows(keys, salt, cols, low, scale, out) -> None:
    for i in range(len(keys)):
        base = mix(keys[i] ^ salt)
        for j in range(out.shape[1]):
            out[i, j] = np.float32(low + scale * _u24(mix(base + cols[j]), 40))


@numba.njit(nogil=True, cache=True)
def _normal_rows(keys, salt, cols, mean, std, rounds, out) -> None:
    d = out.shape[1]
    for i in range(len(keys)):
        base = mix(keys[i] ^ salt)
        for j in range(d):
            bits = mix(base + cols[j])
            z = np.sqrt(-2.0 * np.log(_u24(bits, 40))) * np.cos(2.0 * math.pi * _u24(bits, 16))
            if rounds:  # truncated: redraw beyond 2 sigma from counter d * r + j, then clip
                r = 1
                while r < rounds and abs(z) > 2.0:
                    bits = mix(base + cols[d * r + j])
                    z = np.sqrt(-2.0 * np.log(_u24(bits, 40))) * np.cos(2.0 * math.pi * _u24(bits, 16))
                    r += 1
                z = min(max(z, -2.0), 2.0)
            out[i, j] = np.float32(mean + std * z)
