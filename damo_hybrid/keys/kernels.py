"""Compiled (numba, GIL-free) twins of the key hashes in :mod:`damo_hybrid.keys.hashing`.

One pass per string in machine code, where the numpy versions need a pass per byte position over
every string. They compute the same contract bit for bit (wrapping uint64 arithmetic), and the
tests check them against a byte loop. Compiled on first use and cached on disk by numba.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["fnv_packed", "mix", "mix_inplace", "unique_inverse", "FNV_OFFSET", "FNV_PRIME"]

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True, cache=True, inline="always")
def mix(x: np.uint64) -> np.uint64:
    """splitmix64 finalizer of one uint64 (``hashing.mix64``)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


@numba.njit(nogil=True, cache=True)
def mix_inplace(x: np.ndarray) -> None:
    """``x[i] = mix(x[i])`` for a uint64 (N,) array."""
    for i in range(len(x)):
        x[i] = mix(x[i])


@numba.njit(nogil=True, cache=True)
def fnv_packed(data: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """``out[i]`` = FNV-1a 64 of ``data[offsets[i]:offsets[i + 1]]``.

    Args:
        data: uint8 (M,).
        offsets: int32 or int64 (N + 1,).
        out: uint64 (N,), written.
    """
    for i in range(len(out)):
        h = FNV_OFFSET
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * FNV_PRIME
        out[i] = h


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` for a uint64 key batch, in one hashed pass and a
    radix sort of the distinct keys (several times faster, and without the GIL).

    Args:
        keys: uint64 (N,).
    Returns:
        ``(ukeys uint64 (U,) sorted ascending, inverse int64 (N,))`` with ``ukeys[inverse] == keys``.
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    return _unique_inverse(keys)


@numba.njit(nogil=True, cache=True)
def _unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(keys)
    size = 16
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    table = np.full(size, -1, np.int64)  # -> index of the distinct key, in first-seen order
    first = np.empty(n, np.int64)
    inv = np.empty(n, np.int64)
    u = 0
    for i in range(n):
        k = keys[i]
        p = np.int64(mix(k) & mask)
        while True:
            j = table[p]
            if j < 0:
                table[p] = u
                first[u] = i
                inv[i] = u
                u += 1
                break
            if keys[first[j]] == k:
                inv[i] = j
                break
            p = (p + 1) & (size - 1)
    # LSD radix sort of the distinct keys, 16 bits a pass, carrying their first-seen index
    a = np.empty(u, np.uint64)
    ia = np.arange(u)
    for j in range(u):
        a[j] = keys[first[j]]
    b = np.empty(u, np.uint64)
    ib = np.empty(u, np.int64)
    count = np.empty(1 << 16, np.int64)
    for shift in range(0, 64, 16):
        sh = np.uint64(shift)
        count[:] = 0
        for j in range(u):
            count[np.int64((a[j] >> sh) & np.uint64(0xFFFF))] += 1
        total = 0
        for d in range(1 << 16):
            c = count[d]
            count[d] = total
            total += c
        for j in range(u):
            d = np.int64((a[j] >> sh) & np.uint64(0xFFFF))
            b[count[d]] = a[j]
            ib[count[d]] = ia[j]
            count[d] += 1
        a, b = b, a
        ia, ib = ib, ia
    rank = np.empty(u, np.int64)
    for r in range(u):
        rank[ia[r]] = r
    for i in range(n):
        inv[i] = rank[inv[i]]
    return a, inv
