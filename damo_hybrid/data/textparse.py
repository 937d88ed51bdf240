"""The streaming reader's fast path: a block of delimited text to labels, dense values and keys in
one compiled pass (numba, GIL-free, lines split over threads).

It accepts only lines whose meaning is beyond doubt, and hands any other block back (``None``) to
the slower judges behind it (pyarrow, then the reference line reader), so every row it returns is
the row :func:`~damo_hybrid.data.readers.read_dataset` gives, bit for bit:

- exactly the schema's number of fields, split at a one-byte delimiter; ``\\n`` ends a line, one
  ``\\r`` before it is dropped; empty lines are skipped;
- ASCII only (a byte >= 0x80 or a stray ``\\r`` anywhere sends the block back);
- label and dense values ``[-]digits[.digits]`` with at most 15 significant digits and 22
  decimals: ``m / 10**d`` with both exact in float64 is then the correctly rounded value that
  Python's ``float`` gives (Clinger's fast path); an empty dense value is missing (NaN), an empty
  label sends the block back;
- int ids ``[-]digits`` of at most 18 digits; string ids are hashed with FNV-1a as
  :func:`~damo_hybrid.keys.hashing.hash_feature` does.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from ..keys.hashing import _field_salt, mix64
from ..keys.kernels import FNV_OFFSET, FNV_PRIME, mix
from .schema import Schema

__all__ = ["TextPlan", "plan_text", "parse_text"]

_SKIP, _LABEL, _DENSE, _STR, _INT = 0, 1, 2, 3, 4
_OK, _EMPTY, _BAD = 0, 1, 2
_POW10 = np.array([10.0 ** i for i in range(23)], dtype=np.float64)
_MIN_ROWS_PER_THREAD = 4096


@dataclass(frozen=True)
class TextPlan:
    """How each field of a line is read.

    Attributes:
        sep: the delimiter byte.
        roles: int8 (C,) per file column: skip, label, dense, string id or int id.
        index: int64 (C,) the column's place among the dense values or among the key columns.
        salts: uint64 (K,) per key column, ``mix64(field salt ^ tag)``.
        n_dense: dense columns.
    """

    sep: int
    roles: np.ndarray
    index: np.ndarray
    salts: np.ndarray
    n_dense: int


def plan_text(s: Schema) -> TextPlan | None:
    """The plan for a schema's lines, or None when it names no columns or its delimiter is not one
    ASCII byte."""
    sep = s.sep.encode("utf-8")
    if not s.columns or len(sep) != 1 or sep[0] >= 0x80:
        return None
    roles = np.zeros(len(s.columns), np.int8)
    index = np.zeros(len(s.columns), np.int64)
    salts = np.zeros(len(s.sparse), np.uint64)
    pos = {c: i for i, c in enumerate(s.columns)}
    roles[pos[s.label]] = _LABEL
    for j, c in enumerate(s.dense):
        roles[pos[c]], index[pos[c]] = _DENSE, j
    for j, c in enumerate(s.sparse):
        is_int = c in s.int_sparse
        roles[pos[c]], index[pos[c]] = (_INT if is_int else _STR), j
        salts[j] = mix64(_field_salt(c) ^ np.uint64(1 if is_int else 2))[0]
    return TextPlan(sep[0], roles, index, salts, len(s.dense))


@dataclass(frozen=True)
class ParsedText:
    """Rows of a block: ``label`` float64 (N,), ``dense`` float64 (N, D) (NaN: missing),
    ``keys`` uint64 (K, N), one row per sparse column in schema order."""

    label: np.ndarray
    dense: np.ndarray
    keys: np.ndarray


def parse_text(body: bytes, plan: TextPlan) -> ParsedText | None:
    """Parse a block of whole lines (no BOM, no header), or None if a line needs another judge."""
    buf = np.frombuffer(body, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.empty(len(nl) + 1, np.int64)
    starts[0] = 0
    starts[1:] = nl + 1
    ends = np.empty(len(nl) + 1, np.int64)
    ends[:-1] = nl
    ends[-1] = len(buf)
    n = len(starts)
    label = np.empty(n, np.float64)
    dense = np.empty((n, plan.n_dense), np.float64)
    keys = np.empty((len(plan.salts), n), np.uint64)
    empty = np.zeros(n, np.bool_)
    args = (buf, starts, ends, plan.sep, plan.roles, plan.index, plan.salts, _POW10, label, dense, keys, empty)
    parts = _split(n)
    if len(parts) == 1:
        bad = _parse_lines(0, n, *args)
    else:
        bad = max(_pool().map(lambda lh: _parse_lines(lh[0], lh[1], *args), parts))
    if bad >= 0:
        return None
    if empty.any():
        keep = ~empty
        label, dense, keys = label[keep], dense[keep], keys[:, keep]
    return ParsedText(label, dense, keys)


_POOL: ThreadPoolExecutor | None = None


def _threads() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # not on Linux
        return max(1, min(os.cpu_count() or 1, 8))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_threads(), thread_name_prefix="damo-textparse")
    return _POOL


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, so start a new pool."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _split(n: int) -> list[tuple[int, int]]:
    k = max(1, min(_threads(), n // _MIN_ROWS_PER_THREAD))
    cuts = np.linspace(0, n, k + 1).astype(np.int64)
    return [(int(cuts[i]), int(cuts[i + 1])) for i in range(k)]


@numba.njit(nogil=True, cache=True)
def _number(buf: np.ndarray, a: int, b: int, pow10: np.ndarray) -> tuple[int, float]:
    """``buf[a:b]`` as ``[-]digits[.digits]`` (exactly representable cases only)."""
    if a == b:
        return _EMPTY, 0.0
    neg = buf[a] == 45  # '-'
    i = a + 1 if neg else a
    m = 0
    sig = 0
    digits = 0
    frac = -1  # decimals seen after the point; -1: no point yet
    while i < b:
        c = buf[i]
        if 48 <= c <= 57:
            digits += 1
            if m or c != 48:
                sig += 1
            m = m * 10 + (c - 48)
            if frac >= 0:
                frac += 1
            if sig > 15 or frac > 22:
                return _BAD, 0.0
        elif c == 46 and frac < 0 and digits:  # '.' after at least one digit
            frac = 0
        else:
            return _BAD, 0.0
        i += 1
    if digits == 0 or frac == 0:
        return _BAD, 0.0
    v = float(m) / pow10[frac] if frac > 0 else float(m)
    return _OK, -v if neg else v


@numba.njit(nogil=True, cache=True)
def _int_id(buf: np.ndarray, a: int, b: int) -> tuple[bool, np.int64]:
    """``buf[a:b]`` as ``[-]digits`` of at most 18 digits."""
    neg = a < b and buf[a] == 45
    i = a + 1 if neg else a
    if i == b or b - i > 18:
        return False, np.int64(0)
    v = np.int64(0)
    while i < b:
        c = buf[i]
        if not 48 <= c <= 57:
            return False, np.int64(0)
        v = v * 10 + (c - 48)
        i += 1
    return True, -v if neg else v


@numba.njit(nogil=True, cache=True)
def _parse_lines(lo, hi, buf, starts, ends, sep, roles, index, salts, pow10, label, dense, keys, empty):
    """Rows ``lo .. hi - 1`` (one per line); returns -1, or the first line another judge must read."""
    ncol = len(roles)
    for r in range(lo, hi):
        p = starts[r]
        e = ends[r]
        if e > p and buf[e - 1] == 13:
            e -= 1
        if e == p:
            empty[r] = True
            continue
        c = 0
        f = p
        while True:
            q = f
            h = FNV_OFFSET
            while q < e:
                ch = buf[q]
                if ch == sep:
                    break
                if ch >= 128 or ch == 13:
                    return r
                h = (h ^ np.uint64(ch)) * FNV_PRIME
                q += 1
            if c >= ncol:
                return r
            role = roles[c]
            if role == _STR:
                keys[index[c], r] = mix(h ^ salts[index[c]])
            elif role == _DENSE or role == _LABEL:
                st, v = _number(buf, f, q, pow10)
                if st == _BAD or (st == _EMPTY and role == _LABEL):
                    return r
                if role == _LABEL:
                    label[r] = v
                else:
                    dense[r, index[c]] = np.nan if st == _EMPTY else v
            elif role == _INT:
                ok, iv = _int_id(buf, f, q)
                if not ok:
                    return r
                keys[index[c], r] = mix(np.uint64(iv) ^ salts[index[c]])
            c += 1
            if q >= e:
                break
            f = q + 1
        if c != ncol:
            return r
    return -1
