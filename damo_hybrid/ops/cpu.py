"""CPU implementations of the hot ops (numpy). The reference for the CUDA twins."""

from __future__ import annotations

import numpy as np

from ..rows.optimizers import RowOptimizer

__all__ = ["reduce_by_key", "sum_by_key", "optimizer_step"]


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


def sum_by_key(keys: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """De-duplicate a batch of keys and sum their gradient rows (:func:`reduce_by_key`).

    Args:
        keys: uint64 (N,).
        grads: float32 (N, D).
    Returns:
        ``(ukeys uint64 (U,) sorted, inverse int64 (N,), float32 (U, D) summed gradients)``;
        without duplicates the rows are only reordered (no additions).
    """
    ukeys, inv = np.unique(keys, return_inverse=True)
    if len(ukeys) == len(keys):
        g = np.empty_like(grads)
        g[inv] = grads
        return ukeys, inv, g
    return ukeys, inv, reduce_by_key(grads, inv, len(ukeys))


def optimizer_step(opt: RowOptimizer, w: np.ndarray, state: np.ndarray, g: np.ndarray,
                   count: np.ndarray, lr: float) -> None:
    """One step per row, in place (see :meth:`RowOptimizer.update`)."""
    opt.update(w, state, g, count, lr)
