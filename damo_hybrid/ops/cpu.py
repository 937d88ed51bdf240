"""CPU implementations of the hot ops (numpy). The reference for the CUDA twins."""

from __future__ import annotations

import numpy as np

from ..initializers import RowInitializer
from ..optimizers import RowOptimizer

__all__ = ["gather_rows", "scatter_rows", "reduce_by_key", "init_rows", "optimizer_step"]


def gather_rows(slab: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Rows of a slab.

    Args:
        slab: float32 (S, W).
        slots: int64 (N,) in [0, S).
    Returns:
        float32 (N, W), a copy.
    """
    return slab[slots]


def scatter_rows(slab: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
    """``slab[slots] = rows`` in place; slots must be distinct.

    Args:
        slab: float32 (S, W).
        slots: int64 (N,) distinct.
        rows: float32 (N, W).
    """
    slab[slots] = rows


def reduce_by_key(grads: np.ndarray, inverse: np.ndarray, n_unique: int) -> np.ndarray:
    """Sum gradient rows per unique key, in order of appearance, in float32.

    Args:
        grads: float32 (N, D).
        inverse: int64 (N,) unique-key index of each row (as from ``np.unique(return_inverse=True)``).
        n_unique: number of unique keys U.
    Returns:
        float32 (U, D): ``out[u] = ((0 + g_i1) + g_i2) + ...`` over rows i1 < i2 < ... of key u.
    """
    out = np.zeros((n_unique, grads.shape[1]), dtype=np.float32)
    np.add.at(out, inverse, grads)
    return out


def init_rows(init: RowInitializer, keys: np.ndarray) -> np.ndarray:
    """Initial rows: uint64 (N,) keys -> float32 (N, dim)."""
    return init(keys)


def optimizer_step(opt: RowOptimizer, w: np.ndarray, state: np.ndarray, g: np.ndarray,
                   count: np.ndarray, lr: float) -> None:
    """One step per row, in place (see :meth:`RowOptimizer.update`)."""
    opt.update(w, state, g, count, lr)
