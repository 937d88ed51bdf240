"""Compiled (numba, GIL-free) twin of the host tier's sparse step: gather, update, check, scatter.

The numpy rules of :mod:`damo_hybrid.rows.optimizers` make about a dozen passes over a batch's
rows, each holding the GIL: the gather of the rows from the slab, the finiteness check of the
gradients, the update rule's expressions one by one, the check of the results and the scatter
back. The kernels here gather and update in one pass per row, with a compiled finiteness pass
over the gradients before and over the results after, all in machine code and without the GIL,
so the host manager's and writer's threads run while the worker steps its rows.

They compute the numpy rules **bit for bit**: the same float32 operations in the same order
(float64 where numpy promotes: the per-row rates of adagrad's ``lr_decay`` and adam's bias
corrections), with no fused multiply-adds; the tests compare both on random rows, bit for bit.
A step whose gradients or results hold NaN or Inf is reported, not resolved: the caller then
runs the numpy path, which applies the table's NaN/Inf policy (so the policy's code exists once).

Kinds are the integers of :data:`KIND_CODES`; the hyperparameters travel as one float64 array.
"""

from __future__ import annotations

import numba
import numpy as np

from ..config import OptimizerKind
from .optimizers import RowOptimizer

__all__ = ["RowStep", "KIND_CODES", "OK", "BAD_GRADIENT", "BAD_RESULT", "gather_rows", "scatter_step"]

KIND_CODES = {OptimizerKind.SGD: 0, OptimizerKind.ADAGRAD: 1, OptimizerKind.ROWWISE_ADAGRAD: 2,
              OptimizerKind.ADAM: 3, OptimizerKind.ADAMW: 4, OptimizerKind.FTRL: 5, OptimizerKind.LION: 6}
OK, BAD_GRADIENT, BAD_RESULT = 0, 1, 2

# the hyperparameter array's slots
_WD, _LR_DECAY, _EPS, _B1, _B2, _FTRL_BETA, _L1, _L2 = range(8)


@numba.njit(nogil=True, cache=True, inline="always")
def _finite(x: np.float32) -> bool:
    return not (np.isnan(x) or np.isinf(x))


@numba.njit(nogil=True, cache=True)
def _pairwise_block(a: np.ndarray, lo: int, n: int) -> np.float32:
    """numpy's pairwise sum of at most 128 float32 values: eight partial sums, then the rest."""
    if n < 8:
        s = np.float32(-0.0)
        for i in range(n):
            s += a[lo + i]
        return s
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - (n % 8):
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        s += a[lo + i]
        i += 1
    return s


@numba.njit(nogil=True, cache=True)
def _pairwise_sum(a: np.ndarray, lo: int, n: int) -> np.float32:
    """numpy's float32 pairwise sum of ``a[lo:lo + n]`` (its ``pairwise_sum``: blocks of at most
    128 values, halves above, rounded to multiples of 8), so that rowwise_adagrad's mean equals
    numpy's bit for bit. numpy recurses; this walks the same tree with a stack (numba's disk
    cache cannot hold a recursive function)."""
    if n <= 128:
        return _pairwise_block(a, lo, n)
    los = np.empty(192, np.int64)
    ns = np.empty(192, np.int64)
    combine = np.empty(192, np.bool_)
    vals = np.empty(96, np.float32)
    top, nv = 0, 0
    los[0], ns[0], combine[0] = lo, n, False
    top = 1
    while top:
        top -= 1
        l, m, c = los[top], ns[top], combine[top]
        if c:  # both halves are on the value stack: left + right, as numpy adds them
            nv -= 1
            vals[nv - 1] = vals[nv - 1] + vals[nv]
        elif m <= 128:
            vals[nv] = _pairwise_block(a, l, m)
            nv += 1
        else:
            m2 = m // 2
            m2 -= m2 % 8
            los[top], ns[top], combine[top] = l, m, True
            los[top + 1], ns[top + 1], combine[top + 1] = l + m2, m - m2, False
            los[top + 2], ns[top + 2], combine[top + 2] = l, m2, False
            top += 3
    return vals[0]


@numba.njit(nogil=True, cache=True)
def _gather3(w_slab, st_slab, cnt_slab, slots, out_w, out_st, out_cnt) -> None:
    """The rows of ``slots`` and their counts + 1, in a loop of copies alone: the CPU overlaps
    many of its cache misses, which a loop that also computes waits for one row at a time."""
    for i in range(len(slots)):
        s = slots[i]
        out_cnt[i] = cnt_slab[s] + 1
        for j in range(out_w.shape[1]):
            out_w[i, j] = w_slab[s, j]
        for j in range(out_st.shape[1]):
            out_st[i, j] = st_slab[s, j]


@numba.njit(nogil=True, cache=True)
def _all_finite(a) -> bool:
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not _finite(a[i, j]):
                return False
    return True


@numba.njit(nogil=True, cache=True, inline="always")
def _l2(g, w, wd, j):
    return g[j] + wd * w[j] if wd != 0 else g[j]


# one compiled rule per optimizer (compiled on first use: a table compiles only its own), each
# stepping contiguous rows in place: w (N, dim), st (N, width), cnt (N,) counts after this step

@numba.njit(nogil=True, cache=True)
def _sgd(w, st, cnt, g, lr, p) -> None:
    wd = np.float32(p[_WD])
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            w[i, j] -= lr * _l2(g[i], w[i], wd, j)


@numba.njit(nogil=True, cache=True)
def _adagrad(w, st, cnt, g, lr, p) -> None:
    wd, eps = np.float32(p[_WD]), np.float32(p[_EPS])
    for i in range(g.shape[0]):
        clr = np.float32(np.float64(lr) / (1.0 + (np.float64(cnt[i]) - 1.0) * p[_LR_DECAY]))
        wi, si, gi = w[i], st[i], g[i]
        if wd != 0:
            for j in range(len(gi)):
                gj = gi[j] + wd * wi[j]
                si[j] += gj * gj
                wi[j] -= clr * gj / (np.sqrt(si[j]) + eps)
        else:
            for j in range(len(gi)):
                gj = gi[j]
                si[j] += gj * gj
                wi[j] -= clr * gj / (np.sqrt(si[j]) + eps)


@numba.njit(nogil=True, cache=True)
def _rowwise_adagrad(w, st, cnt, g, lr, p) -> None:
    wd, eps = np.float32(p[_WD]), np.float32(p[_EPS])
    d = g.shape[1]
    gi = np.empty(d, np.float32)
    sq = np.empty(d, np.float32)
    for i in range(g.shape[0]):
        clr = np.float32(np.float64(lr) / (1.0 + (np.float64(cnt[i]) - 1.0) * p[_LR_DECAY]))
        for j in range(d):
            gi[j] = _l2(g[i], w[i], wd, j)
            sq[j] = gi[j] * gi[j]
        st[i, 0] += _pairwise_sum(sq, 0, d) / np.float32(d)
        den = np.sqrt(st[i, 0]) + eps
        for j in range(d):
            w[i, j] -= clr * gi[j] / den


@numba.njit(nogil=True, cache=True)
def _adam(w, st, cnt, g, lr, p, decoupled) -> None:
    wd, eps = np.float32(p[_WD]), np.float32(p[_EPS])
    b1c, b2, b2c = np.float32(1.0 - p[_B1]), np.float32(p[_B2]), np.float32(1.0 - p[_B2])
    d = g.shape[1]
    for i in range(g.shape[0]):
        if decoupled and wd != 0:  # adamw: the weights decay first, the gradient has no L2 term
            f = np.float32(1.0) - lr * wd
            for j in range(d):
                w[i, j] *= f
        t = np.float64(cnt[i])
        step_size = np.float32(np.float64(lr) / (1.0 - p[_B1] ** t))
        bc2 = np.float32(np.sqrt(1.0 - p[_B2] ** t))
        for j in range(d):
            gj = g[i, j] if decoupled else _l2(g[i], w[i], wd, j)
            m = st[i, j]
            m += b1c * (gj - m)
            st[i, j] = m
            v = st[i, d + j] * b2
            v += b2c * gj * gj
            st[i, d + j] = v
            w[i, j] -= step_size * m / (np.sqrt(v) / bc2 + eps)


@numba.njit(nogil=True, cache=True)
def _ftrl(w, st, cnt, g, lr, p) -> None:
    beta, l1, l2 = np.float32(p[_FTRL_BETA]), np.float32(p[_L1]), np.float32(p[_L2])
    d = g.shape[1]
    for i in range(g.shape[0]):
        for j in range(d):
            gj = g[i, j]
            nn = st[i, d + j]
            n_new = nn + gj * gj
            sigma = (np.sqrt(n_new) - np.sqrt(nn)) / lr
            z = st[i, j] + (gj - sigma * w[i, j])
            st[i, j] = z
            st[i, d + j] = n_new
            if abs(z) <= l1:
                w[i, j] = np.float32(0.0)
            else:
                w[i, j] = -(z - np.sign(z) * l1) / ((beta + np.sqrt(n_new)) / lr + l2)


@numba.njit(nogil=True, cache=True)
def _lion(w, st, cnt, g, lr, p) -> None:
    wd = np.float32(p[_WD])
    b1, b1c = np.float32(p[_B1]), np.float32(1.0 - p[_B1])
    b2, b2c = np.float32(p[_B2]), np.float32(1.0 - p[_B2])
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            gj = g[i, j]
            m = st[i, j]
            u = np.sign(b1 * m + b1c * gj)
            if wd != 0:
                u = u + wd * w[i, j]
            w[i, j] -= lr * u
            m *= b2
            m += b2c * gj
            st[i, j] = m


@numba.njit(nogil=True, cache=True)
def scatter_step(w_slab, st_slab, cnt_slab, updated, dirty, slots, w, st, cnt, now) -> None:
    """Store a staged step: ``slab[slots] = (w, st, cnt)``, ``updated[slots] = now``, dirty."""
    for i in range(len(slots)):
        s = slots[i]
        for j in range(w.shape[1]):
            w_slab[s, j] = w[i, j]
        for j in range(st.shape[1]):
            st_slab[s, j] = st[i, j]
        cnt_slab[s] = cnt[i]
        updated[s] = now
        dirty[s] = True


@numba.njit(nogil=True, cache=True)
def _gather(slab, slots, out) -> None:
    for i in range(len(slots)):
        s = slots[i]
        for j in range(slab.shape[1]):
            out[i, j] = slab[s, j]


def gather_rows(slab: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """``slab[slots]`` without the GIL: float32 (N, W) from a float32 (C, W) slab and int64 (N,) slots."""
    out = np.empty((len(slots), slab.shape[1]), dtype=slab.dtype)
    _gather(slab, np.ascontiguousarray(slots, dtype=np.int64), out)
    return out


class RowStep:
    """The compiled step of one table's float32 rows (see the module doc).

    Args:
        opt: the table's update rule.
    """

    def __init__(self, opt: RowOptimizer) -> None:
        self.kind = KIND_CODES[opt.kind]
        self.dim, self.width = opt.dim, opt.width
        self.params = np.zeros(8, dtype=np.float64)
        self.params[_WD], self.params[_LR_DECAY], self.params[_EPS] = opt.wd, opt.lr_decay, opt.eps
        self.params[_B1], self.params[_B2] = opt.b1, opt.b2
        self.params[_FTRL_BETA], self.params[_L1], self.params[_L2] = opt.ftrl_beta, opt.l1, opt.l2

    def stage(self, w_slab: np.ndarray, st_slab: np.ndarray, cnt_slab: np.ndarray, slots: np.ndarray,
              g: np.ndarray, lr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """One step of resident rows on copies (the slab is not changed).

        Args:
            w_slab: float32 (C, dim); st_slab: float32 (C, width); cnt_slab: int64 (C,).
            slots: int64 (U,) distinct slots.
            g: float32 (U, dim) summed gradients.
            lr: the step's learning rate.
        Returns:
            ``(weights (U, dim), state (U, width), count (U,), status)``: status is :data:`OK`,
            :data:`BAD_GRADIENT` or :data:`BAD_RESULT` (then the arrays mean nothing).
        """
        n = len(slots)
        w = np.empty((n, self.dim), dtype=np.float32)
        st = np.empty((n, self.width), dtype=np.float32)
        cnt = np.empty(n, dtype=np.int64)
        g = np.ascontiguousarray(g, dtype=np.float32)
        if not _all_finite(g):
            return w, st, cnt, BAD_GRADIENT
        _gather3(w_slab, st_slab, cnt_slab, np.ascontiguousarray(slots, dtype=np.int64), w, st, cnt)
        lr32 = np.float32(lr)
        k = self.kind
        if k == KIND_CODES[OptimizerKind.SGD]:
            _sgd(w, st, cnt, g, lr32, self.params)
        elif k == KIND_CODES[OptimizerKind.ADAGRAD]:
            _adagrad(w, st, cnt, g, lr32, self.params)
        elif k == KIND_CODES[OptimizerKind.ROWWISE_ADAGRAD]:
            _rowwise_adagrad(w, st, cnt, g, lr32, self.params)
        elif k in (KIND_CODES[OptimizerKind.ADAM], KIND_CODES[OptimizerKind.ADAMW]):
            _adam(w, st, cnt, g, lr32, self.params, k == KIND_CODES[OptimizerKind.ADAMW])
        elif k == KIND_CODES[OptimizerKind.FTRL]:
            _ftrl(w, st, cnt, g, lr32, self.params)
        else:
            _lion(w, st, cnt, g, lr32, self.params)
        ok = _all_finite(w) and (st.shape[1] == 0 or _all_finite(st))
        return w, st, cnt, OK if ok else BAD_RESULT
