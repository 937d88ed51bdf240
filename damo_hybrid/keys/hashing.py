"""Feature values -> uint64 keys, vectorized and stable forever.

The algorithm is part of the on-disk contract: changing it re-keys every
stored row. It uses only 64-bit integer arithmetic (wrapping), so it gives the
same keys on every platform, process and version:

- ``fnv1a64(b)``: FNV-1a over the bytes ``b`` (offset basis
  ``0xcbf29ce484222325``, prime ``0x100000001b3``).
- ``mix64(x)``: the splitmix64 finalizer
  ``x ^= x >> 30; x *= 0xbf58476d1ce4e5b9; x ^= x >> 27; x *= 0x94d049bb133111eb; x ^= x >> 31``.
- A field's salt is ``F = fnv1a64(utf8(field))`` (an int field is first written
  in decimal).
- An integer value ``v`` (read as its 64-bit two's-complement bits) maps to
  ``mix64(v ^ mix64(F ^ 1))``.
- A ``str`` value is UTF-8 encoded; a ``bytes`` value ``b`` maps to
  ``mix64(fnv1a64(b) ^ mix64(F ^ 2))``.

So the int ``5`` and the string ``"5"`` are different keys, as are equal values
in different fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .kernels import FNV_OFFSET, fnv_packed, mix_inplace

__all__ = ["mix64", "fnv1a64", "fnv1a64_packed", "hash_feature", "hash_packed", "as_keys"]

_TAG_INT = np.uint64(1)
_TAG_BYTES = np.uint64(2)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, a bijection on uint64.

    Args:
        x: uint64 array of any shape.
    Returns:
        uint64 array of the same shape (a new array).
    """
    x = np.array(x, dtype=np.uint64, copy=True, ndmin=1)
    mix_inplace(x.reshape(-1))
    return x


def fnv1a64(values: Sequence[bytes]) -> np.ndarray:
    """FNV-1a 64 of each byte string, vectorized over the batch.

    Args:
        values: N byte strings.
    Returns:
        uint64 (N,).
    """
    n = len(values)
    if n == 0:
        return np.full(0, FNV_OFFSET, dtype=np.uint64)
    lens = np.fromiter(map(len, values), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return fnv1a64_packed(np.frombuffer(b"".join(values), dtype=np.uint8), offsets)


def fnv1a64_packed(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """FNV-1a 64 of N byte strings packed end to end (Arrow's string layout), with no per-string Python.

    Args:
        data: uint8 (M,) the strings' bytes.
        offsets: int (N + 1,) string ``i`` is ``data[offsets[i]:offsets[i + 1]]``.
    Returns:
        uint64 (N,), equal to :func:`fnv1a64` of the same strings.
    """
    offsets = np.ascontiguousarray(offsets)
    if offsets.dtype not in (np.int32, np.int64):
        offsets = offsets.astype(np.int64)
    n = len(offsets) - 1
    out = np.empty(max(n, 0), dtype=np.uint64)
    if n > 0:
        if len(offsets) and (offsets[0] < 0 or offsets[-1] > len(data) or (np.diff(offsets) < 0).any()):
            raise ValueError(f"offsets must rise from 0 to at most {len(data)} (the data's length)")
        fnv_packed(np.ascontiguousarray(data, dtype=np.uint8), offsets, out)
    return out


def _field_salt(field: str | int) -> np.uint64:
    if isinstance(field, (int, np.integer)) and not isinstance(field, bool):
        field = str(int(field))
    if not isinstance(field, str):
        raise TypeError(f"field must be a str or int, got {type(field).__name__}")
    return fnv1a64([field.encode("utf-8")])[0]


def as_keys(keys: Any, name: str = "keys") -> np.ndarray:
    """Validate a key batch and view it as uint64.

    Args:
        keys: 1-D numpy array of uint64, or int64 (read as the same bits).
    Returns:
        uint64 (N,), a view when no conversion was needed.
    Raises:
        TypeError: not a numpy array of uint64/int64.
        ValueError: not 1-D.
    """
    if not isinstance(keys, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of uint64 or int64, got {type(keys).__name__}")
    if keys.dtype == np.int64:
        keys = keys.view(np.uint64)
    elif keys.dtype != np.uint64:
        raise TypeError(f"{name} must have dtype uint64 or int64, got {keys.dtype}")
    if keys.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {keys.shape}")
    return keys


def hash_feature(field: str | int, values: Any) -> np.ndarray:
    """Hash one field's raw values into uint64 keys.

    Args:
        field: the field (column) name or number; it salts the hash.
        values: N values, all ints, all ``str`` or all ``bytes``: a list, or
            a numpy array of an integer, unicode (``U``) or bytes (``S``) dtype.
            For an ``S`` array numpy drops trailing NUL bytes; pass a list of
            ``bytes`` when those matter.
    Returns:
        uint64 (N,).

    Example:
        >>> hash_feature("C1", ["68fd1e64", "80e26c9b"]).dtype
        dtype('uint64')
    """
    salt = _field_salt(field)
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {values.shape}")
        if values.dtype.kind in "iu":
            v = values.astype(np.int64, copy=False).view(np.uint64) if values.dtype.kind == "i" else values.astype(np.uint64)
            return mix64(v ^ mix64(salt ^ _TAG_INT)[0])
        if values.dtype.kind in "US":
            values = values.tolist()
        elif values.dtype.kind == "O":
            values = values.tolist()
        else:
            raise TypeError(f"values dtype {values.dtype} is not an integer, str or bytes type")
    values = list(values)
    if not values:
        return np.zeros(0, dtype=np.uint64)
    first = values[0]
    if isinstance(first, (int, np.integer)) and not isinstance(first, (bool, np.bool_)):
        # every value an int: a float (7.5), a bool or a str among them is refused, never converted
        odd = [t for t in set(map(type, values)) if not issubclass(t, (int, np.integer)) or issubclass(t, bool)]
        if odd:
            raise TypeError(f"values must all be ints when the first one is, got {odd[0].__name__}")
        ints = _ints_as_u64(values)
        return mix64(ints ^ mix64(salt ^ _TAG_INT)[0])
    if isinstance(first, str):
        try:
            data = list(map(str.encode, values))
        except TypeError as e:
            raise TypeError("values must all be str when the first one is") from e
    elif isinstance(first, (bytes, bytearray, memoryview)):
        odd = [t for t in set(map(type, values)) if not issubclass(t, (bytes, bytearray, memoryview))]
        if odd:  # bytes(5) would be five NUL bytes
            raise TypeError(f"values must all be bytes when the first one is, got {odd[0].__name__}")
        data = [bytes(x) for x in values] if not all(isinstance(x, bytes) for x in values) else values
    else:
        raise TypeError(f"values must be ints, str or bytes, got {type(first).__name__}")
    return mix64(fnv1a64(data) ^ mix64(salt ^ _TAG_BYTES)[0])


def hash_packed(field: str | int, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """:func:`hash_feature` of N strings given packed (UTF-8 bytes ``data``, int ``offsets``
    (N + 1,), as an Arrow string column holds them): the same keys, without a Python object per
    value."""
    return mix64(fnv1a64_packed(data, offsets) ^ mix64(_field_salt(field) ^ _TAG_BYTES)[0])


def _ints_as_u64(values: list[Any]) -> np.ndarray:
    """Python ints in [-2**63, 2**64) as their 64-bit two's-complement patterns."""
    for dtype in (np.int64, np.uint64):
        try:
            return np.asarray(values, dtype=dtype).view(np.uint64)
        except (OverflowError, ValueError, TypeError):
            continue
    # a mix of negatives and values >= 2**63: go through Python ints once
    try:
        arr = np.array([int(v) for v in values], dtype=object)
    except (TypeError, ValueError) as e:
        raise TypeError("integer values must all be ints") from e
    if (arr < -(2**63)).any() or (arr >= 2**64).any():
        raise TypeError("integer values must lie in [-2**63, 2**64)")
    return (arr & 0xFFFFFFFFFFFFFFFF).astype(np.uint64)
