"""Deterministic row initialisation.

A row is a pure function of ``(seed, table name, key)``: the same in every
process, after the row was evicted or expired, and on every backend. Each
value comes from a counter-based generator:

- ``base = mix64(mix64(seed ^ fnv1a64(table)) ^ key)`` per row;
- ``bits(c) = mix64(base + (c + 1) * 0x9e3779b97f4a7c15)`` for counter ``c``;
- a uniform in (0, 1) is ``((bits >> 40) + 0.5) / 2**24``, exact in float32;
- normals use Box-Muller on two uniforms (counters ``2j`` and ``2j + 1`` for
  column ``j``), computed in float64 and rounded to float32;
- a truncated normal redraws (with counters shifted by ``2 * dim`` per round)
  values outside ``mean +- 2 std``, up to 8 rounds, then clips (the chance of
  reaching the clip is about 1e-11 per value).

``xavier_uniform`` treats a row as the weight of a one-hot input, so
``fan_in = 1`` and ``fan_out = dim``: ``U(-b, b)`` with ``b = sqrt(6 / (1 + dim))``.

Keep in sync with ``kernels/init_rows.cu`` when the CUDA twin lands.
"""

from __future__ import annotations

import math

import numpy as np

from .config import InitializerConfig, InitializerKind
from .hashing import fnv1a64, mix64

__all__ = ["RowInitializer"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TRUNC_ROUNDS = 8


class RowInitializer:
    """Initial rows of one table.

    Args:
        config: the table's initializer.
        table: the table name (part of the seed, so equal keys in different
            tables start differently).
        dim: row width.
    """

    def __init__(self, config: InitializerConfig, table: str, dim: int) -> None:
        self.kind = config.kind
        self.dim = dim
        self.low, self.high = float(config.low), float(config.high)
        self.mean, self.std = float(config.mean), float(config.std)
        table_salt = fnv1a64([table.encode("utf-8")])[0]
        self._salt = mix64(np.uint64(config.seed) ^ table_salt)[0]
        # counters of column j for draw-stream s are s * dim + j
        self._cols = (np.arange(1, 4 * _TRUNC_ROUNDS * dim + 1, dtype=np.uint64) * _GOLDEN)

    def _uniform(self, base: np.ndarray, first: int, count: int) -> np.ndarray:
        """float64 (N, count) uniforms in (0, 1) for counters first..first+count-1."""
        bits = mix64(base[:, None] + self._cols[None, first:first + count])
        return ((bits >> np.uint64(40)).astype(np.float64) + 0.5) * (1.0 / (1 << 24))

    def _normal(self, base: np.ndarray, first: int) -> np.ndarray:
        d = self.dim
        u = self._uniform(base, first, 2 * d)
        u1, u2 = u[:, 0::2], u[:, 1::2]
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """Initial rows.

        Args:
            keys: uint64 (N,).
        Returns:
            float32 (N, dim).
        """
        n, d = len(keys), self.dim
        if self.kind is InitializerKind.ZEROS:
            return np.zeros((n, d), dtype=np.float32)
        if self.kind is InitializerKind.ONES:
            return np.ones((n, d), dtype=np.float32)
        base = mix64(keys.astype(np.uint64, copy=False) ^ self._salt)
        if self.kind is InitializerKind.UNIFORM:
            u = self._uniform(base, 0, d)
            return (self.low + (self.high - self.low) * u).astype(np.float32)
        if self.kind is InitializerKind.XAVIER_UNIFORM:
            b = math.sqrt(6.0 / (1.0 + d))
            return (-b + 2.0 * b * self._uniform(base, 0, d)).astype(np.float32)
        if self.kind is InitializerKind.NORMAL:
            return (self.mean + self.std * self._normal(base, 0)).astype(np.float32)
        # truncated normal within 2 sigma: redraw the out-of-range values
        z = self._normal(base, 0)
        for r in range(1, _TRUNC_ROUNDS):
            bad = np.abs(z) > 2.0
            if not bad.any():
                break
            rows = np.nonzero(bad.any(axis=1))[0]
            z2 = self._normal(base[rows], 2 * d * r)
            zr = z[rows]
            m = bad[rows]
            zr[m] = z2[m]
            z[rows] = zr
        np.clip(z, -2.0, 2.0, out=z)
        return (self.mean + self.std * z).astype(np.float32)
