"""How a table holds its weights: float32, or 16 bits with stochastic rounding.

With a 16-bit ``row_dtype`` a row's weights are kept in 16 bits in every tier (the host and
device caches, the stored value), so a cache budget holds more rows and a stored row is
smaller. Arithmetic stays float32: an update reads the 16-bit weights as float32 (exactly),
steps them with the float32 update rule, and rounds the result back to the 16-bit grid.

Formats:

- ``float16``: IEEE half precision (11-bit significand, largest finite 65504, subnormals
  down to 2**-24);
- ``bfloat16``: float32's exponent range with an 8-bit significand;
- ``int16``: fixed point, ``w = q * step`` with ``q`` in ``[-32767, 32767]`` and ``step`` a
  power of two (:attr:`TableConfig.int16_step <damo_hybrid.config.TableConfig.int16_step>`,
  default ``2**-13``: a range of about +-4 in steps of 1.2e-4).

Optimizer state stays float32 for every optimizer. Adagrad's and Adam's accumulators are
sums of many small squares, and FTRL's ``z, n`` are sums of gradients: rounded to 16 bits,
each addition smaller than half a grid step would be lost or become noise, and the update
rule would no longer be the one documented in :mod:`~damo_hybrid.rows.optimizers`. The weights
alone carry the rounding, which is unbiased.

Rounding:

- An **update** rounds stochastically, on the magnitude: with ``s`` the grid spacing at ``|w|``
  (a power of two), ``|w'| = floor(|w| / s + u) * s`` with ``u`` uniform in [0, 1), so ``E[w'] = w``
  (unbiased) and small updates are not lost on average. For float16 and bfloat16 ``|w| / s`` has
  ``24 - p`` fraction bits (``p`` the format's significand bits) and ``u`` is drawn with as many,
  so the float32 arithmetic is exact and the rounding exactly unbiased (below float16's normal
  range, to within 2**-13 of a step); int16 computes in float64 with a 24-bit ``u``. ``u`` is a
  pure function of the table, the key, the row's update count after this update and the column:
  ``base = mix64(mix64(key ^ salt) + count * G)``, then ``mix64(base + (i + 1) * G)`` for
  ``i = 0, 1, ...`` gives 64-bit words cut into 16-bit chunks (32-bit for int16), low chunk
  first, one per column; ``u`` is a chunk's top bits (``G = 0x9e3779b97f4a7c15``, ``salt`` from the table's
  initializer seed and name). So a run is reproducible, whichever tier steps a row, and the CPU
  (numpy) and torch (CPU or CUDA) twins agree bit for bit.
- **Initial** rows round to nearest (ties to even); an int16 initial value beyond the range
  is clipped to it.
- A result that rounds past the format's range becomes +-Inf, which the table's NaN/Inf policy
  then refuses (``raise``) or drops (``skip``): nothing is clipped to the range silently (a result
  less than a grid step past it may round down onto the largest value, as any rounding would).
"""

from __future__ import annotations

import enum

import numpy as np

from .keys.hashing import mix64

__all__ = ["RowDtype", "RowPrecision", "check_int16_step", "DEFAULT_INT16_STEP"]

DEFAULT_INT16_STEP = 2.0 ** -13
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_INV24 = 1.0 / (1 << 24)
_Q_MAX = 32767


def _pow2_f32(k: np.ndarray) -> np.ndarray:
    """float32 ``2**k`` for int32 ``k`` in [-149, 127] (subnormal below -126), built from its bits
    (in ``k``'s memory)."""
    sub = k < -126
    tiny = np.left_shift(1, np.clip(k[sub] + 149, 0, 22)) if sub.any() else None
    k += 127
    k <<= 23
    if tiny is not None:
        k[sub] = tiny
    return k.view(np.float32)


class RowDtype(str, enum.Enum):
    """How a table's weights are held (see the module docstring)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT16 = "int16"


# significand bits and the exponent of the smallest spacing, per floating format
_FLOAT_GRID = {RowDtype.FLOAT16: (11, -24), RowDtype.BFLOAT16: (8, -133)}
# the stored code of each format (the row codec's header)
CODES = {RowDtype.FLOAT32: 0, RowDtype.FLOAT16: 1, RowDtype.BFLOAT16: 2, RowDtype.INT16: 3}


def check_int16_step(step: float) -> float:
    """``step`` as a float, if it is a power of two in [2**-24, 2**-4].

    Raises:
        ValueError: otherwise.
    """
    if isinstance(step, bool) or not isinstance(step, (int, float, np.floating, np.integer)):
        raise ValueError(f"int16_step must be a power of two in [2**-24, 2**-4], got {step!r}")
    m, e = np.frexp(float(step))
    if m != 0.5 or not -24 <= e - 1 <= -4:
        raise ValueError(f"int16_step must be a power of two in [2**-24, 2**-4], got {step!r}")
    return float(step)


class RowPrecision:
    """The weight format of one table: rounding, and packing into its 16-bit slab.

    Args:
        dtype: the format.
        int16_step: the int16 grid step (a power of two).
        salt: uint64 seed of the table's rounding stream.
    """

    def __init__(self, dtype: RowDtype | str, int16_step: float = DEFAULT_INT16_STEP,
                 salt: int = 0) -> None:
        self.dtype = RowDtype(dtype)
        self.step = check_int16_step(int16_step)
        self.salt = np.uint64(salt)
        self.exact = self.dtype is RowDtype.FLOAT32  # no rounding at all
        self.itemsize = 4 if self.exact else 2
        self.code = CODES[self.dtype]
        self.slab_dtype = np.dtype({RowDtype.FLOAT32: np.float32, RowDtype.FLOAT16: np.float16,
                                    RowDtype.BFLOAT16: np.uint16, RowDtype.INT16: np.int16}[self.dtype])
        if self.dtype is RowDtype.INT16:
            self.max = _Q_MAX * self.step
        else:
            self.max = float({RowDtype.FLOAT32: np.finfo(np.float32).max, RowDtype.FLOAT16: 65504.0,
                              RowDtype.BFLOAT16: 3.3895313892515355e38}[self.dtype])

    # ------------------------------------------------------------------ rounding
    def _random(self, keys: np.ndarray, count: np.ndarray, dim: int, nbits: int) -> np.ndarray:
        """uint (N, dim) random ``nbits``-bit integers: the rounding stream of rows ``keys`` at
        update ``count`` (see the module docstring)."""
        c = np.asarray(count).astype(np.uint64)
        base = mix64(mix64(np.asarray(keys, np.uint64) ^ self.salt) + c * _GOLDEN)
        chunk = 16 if nbits <= 16 else 32
        words = -(-dim * chunk // 64)
        h = mix64(base[:, None] + np.arange(1, words + 1, dtype=np.uint64)[None, :] * _GOLDEN)
        r = h.view(np.uint16 if chunk == 16 else np.uint32)[:, :dim]
        return r >> (chunk - nbits)

    def stochastic(self, w: np.ndarray, keys: np.ndarray, count: np.ndarray) -> np.ndarray:
        """float32 (N, dim) ``w`` rounded to the grid, unbiased (the module docstring).

        Args:
            w: float32 (N, dim) stepped weights (NaN/Inf stay NaN/Inf).
            keys: uint64 (N,) their keys.
            count: int (N,) their update counts after this update.
        Returns:
            ``w`` itself for float32 tables, else a new float32 (N, dim).
        """
        if self.exact or not w.size:
            return w
        a = np.abs(w)
        with np.errstate(invalid="ignore", over="ignore"):
            if self.dtype is RowDtype.INT16:
                u = self._random(keys, count, w.shape[1], 24).astype(np.float64)
                u *= _INV24
                y64 = a.astype(np.float64)
                y64 /= self.step
                y64 += u
                np.floor(y64, out=y64)
                y64 *= self.step
                y = y64.astype(np.float32)
            else:
                p, emin = _FLOAT_GRID[self.dtype]
                k = a.view(np.int32) >> 23
                np.maximum(k, 1, out=k)
                k -= 127 + p - 1
                np.maximum(k, emin, out=k)
                s = _pow2_f32(k)
                frac = 24 - p  # a / s has p integer and 24 - p fraction bits: u has as many
                y = np.divide(a, s, out=a)
                y += self._random(keys, count, w.shape[1], frac).astype(np.float32) * np.float32(2.0 ** -frac)
                np.floor(y, out=y)
                y *= s
        y[y > self.max] = np.inf
        np.copysign(y, w, out=y)
        bad = ~np.isfinite(w)
        if bad.any():
            y[bad] = w[bad]
        return y

    def nearest(self, w: np.ndarray) -> np.ndarray:
        """float32 ``w`` rounded to the nearest grid value, ties to even (initial rows); int16
        clips to its range."""
        if self.exact:
            return w
        if self.dtype is RowDtype.INT16:
            q = np.clip(np.rint(w.astype(np.float64) / self.step), -_Q_MAX, _Q_MAX)
            return (q * self.step).astype(np.float32)
        return self.unpack(self.pack_nearest(w))

    # ------------------------------------------------------------------ slabs
    def pack_nearest(self, w: np.ndarray) -> np.ndarray:
        """float32 -> the slab's dtype, rounding to nearest (exact for values on the grid)."""
        if self.exact:
            return np.asarray(w, np.float32)
        if self.dtype is RowDtype.FLOAT16:
            with np.errstate(over="ignore"):
                return np.asarray(w, np.float32).astype(np.float16)
        if self.dtype is RowDtype.BFLOAT16:
            w32 = np.ascontiguousarray(w, np.float32)
            b = w32.view(np.uint32).astype(np.uint64)
            b = (b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
            out = b.astype(np.uint16)
            nan = np.isnan(w32)
            if nan.any():  # a NaN stays a NaN (rounding its payload could carry into Inf or 0)
                out[nan] = (w32.view(np.uint32)[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x7FC0)
            return out
        return np.clip(np.rint(np.asarray(w, np.float64) / self.step), -_Q_MAX, _Q_MAX).astype(np.int16)

    def pack(self, w: np.ndarray) -> np.ndarray:
        """float32 weights already on the grid -> the slab's dtype (exact; int16 refuses what it
        cannot hold instead of clipping it).

        Raises:
            ValueError: an int16 weight beyond the range, NaN or Inf (callers store only checked rows).
        """
        if self.dtype is RowDtype.INT16 and w.size and not np.abs(w).max() <= self.max:
            raise ValueError(f"int16 rows cannot hold weights beyond +-{self.max:g}, NaN or Inf; got max |w| "
                             f"{np.abs(w).max():g}")
        return self.pack_nearest(w)

    def unpack(self, a: np.ndarray) -> np.ndarray:
        """The slab's dtype -> float32 (exact)."""
        if self.exact:
            return np.asarray(a, np.float32)
        if self.dtype is RowDtype.FLOAT16:
            return a.astype(np.float32)
        if self.dtype is RowDtype.BFLOAT16:
            return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return a.astype(np.float32) * np.float32(self.step)

    # ------------------------------------------------------------------ torch twin
    @property
    def torch_dtype(self):  # type: ignore[no-untyped-def]
        """The device slab's torch dtype."""
        import torch

        return {RowDtype.FLOAT32: torch.float32, RowDtype.FLOAT16: torch.float16,
                RowDtype.BFLOAT16: torch.bfloat16, RowDtype.INT16: torch.int16}[self.dtype]

    def stochastic_t(self, w, keys, count):  # type: ignore[no-untyped-def]
        """:meth:`stochastic` on torch tensors of any device, bit for bit the same.

        Args:
            w: float32 (N, dim).
            keys: int64 (N,) the keys' bits.
            count: int64 (N,) update counts after this update.
        """
        import torch

        if self.exact or not w.numel():
            return w
        salt = int(self.salt) - (1 << 64) if int(self.salt) >= 1 << 63 else int(self.salt)
        g = int(_GOLDEN) - (1 << 64)
        base = _mix64_t(_mix64_t(keys ^ salt) + count * g)
        dim = w.shape[1]

        def random(nbits: int):  # type: ignore[no-untyped-def]
            chunk = 16 if nbits <= 16 else 32
            words = -(-dim * chunk // 64)
            h = _mix64_t(base[:, None] + torch.arange(1, words + 1, dtype=torch.int64, device=w.device)[None, :] * g)
            r = h.view(torch.int16 if chunk == 16 else torch.int32)[:, :dim].to(torch.int64) & ((1 << chunk) - 1)
            return r >> (chunk - nbits)

        a = w.abs()
        if self.dtype is RowDtype.INT16:
            u = random(24).to(torch.float64) * _INV24
            y = (torch.floor(a.to(torch.float64) / self.step + u) * self.step).to(torch.float32)
        else:
            p, emin = _FLOAT_GRID[self.dtype]
            k = torch.clamp(torch.clamp(a.view(torch.int32) >> 23, min=1) - (127 + p - 1), min=emin)
            bits = torch.where(k >= -126, (k + 127) << 23, 1 << torch.clamp(k + 149, 0, 22))
            s = bits.to(torch.int32).view(torch.float32)
            frac = 24 - p
            u = random(frac).to(torch.float32) * 2.0 ** -frac
            y = torch.floor(a / s + u) * s
        y = torch.where(y > self.max, torch.full_like(y, torch.inf), y)
        y = torch.copysign(y, w)
        return torch.where(torch.isfinite(w), y, w)

    def pack_t(self, w):  # type: ignore[no-untyped-def]
        """float32 tensor on the grid -> the device slab's dtype (exact)."""
        import torch

        if self.dtype is RowDtype.INT16:
            return torch.clamp(torch.round(w.to(torch.float64) / self.step), -_Q_MAX, _Q_MAX).to(torch.int16)
        return w.to(self.torch_dtype)

    def unpack_t(self, a):  # type: ignore[no-untyped-def]
        """The device slab's dtype -> float32 tensor (exact)."""
        import torch

        if self.dtype is RowDtype.INT16:
            return a.to(torch.float32) * self.step
        return a.to(torch.float32)


_M1_T = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2_T = 0x94D049BB133111EB - (1 << 64)


def _mix64_t(x):  # type: ignore[no-untyped-def]
    """:func:`~damo_hybrid.keys.hashing.mix64` on int64 tensors holding uint64 bits (products wrap
    as in uint64; right shifts are made logical by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1_T
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2_T
    return x ^ ((x >> 31) & ((1 << 33) - 1))
