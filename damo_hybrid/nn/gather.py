"""The worker's gathers: a batch's rows from the leaf of its unique rows, shaped for the models.

:class:`TableOutput` is what :meth:`EmbeddingCollection.forward_tables
<damo_hybrid.nn.collection.EmbeddingCollection.forward_tables>` returns per table; for a table
with ``linear_column``, :func:`split_gather` reads the embedding and the first-order weight with
one autograd function. :func:`combine_parts` builds a compressed table's rows from the rows of its
partitions (:mod:`damo_hybrid.keys.compression`).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch

__all__ = ["TableOutput", "combine", "combine_parts", "split_gather"]


class TableOutput(NamedTuple):
    """One table's rows for a batch (:meth:`EmbeddingCollection.forward_tables`).

    Attributes:
        emb: float32 (B, F_t, D): each feature's embedding, in feature order; D is the table's
            dim (``P`` times it for a compressed table that concatenates ``P`` partitions), less
            one for a table with ``linear_column``.
        linear: float32 (B, F_t): each feature's first-order weight (the row's last column) for a
            table with ``linear_column``, else None.
    """

    emb: torch.Tensor
    linear: torch.Tensor | None


class _SplitGather(torch.autograd.Function):
    """``rows[idx]`` split into the embedding columns and the linear column, each contiguous.

    One ``index_select`` per part forward; backward adds both parts straight into the leaf's
    gradient: no (B * F, width) intermediate, and no zero-filled buffers for the slices'
    gradients (what ``rows[idx][..., :D]`` and ``rows[idx][..., D]`` cost autograd). On the CPU
    the adds are one compiled pass without the GIL (``index_add_`` into a column slice of the
    gradient takes several times longer), in the order of ``idx`` as ``index_add_``'s.
    """

    @staticmethod
    def forward(ctx, leaf: torch.Tensor, idx: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(idx)
        ctx.shape = leaf.shape
        return leaf[:, :d].index_select(0, idx), leaf[:, d].index_select(0, idx)

    @staticmethod
    def backward(ctx, g_emb: torch.Tensor | None, g_lin: torch.Tensor | None) -> tuple[torch.Tensor, None, None]:
        (idx,) = ctx.saved_tensors
        grad = g_emb.new_zeros(ctx.shape) if g_emb is not None else g_lin.new_zeros(ctx.shape)
        d = ctx.shape[1] - 1
        if grad.device.type == "cpu" and grad.dtype == torch.float32 and g_emb is not None and g_lin is not None:
            _split_add(grad.numpy(), idx.numpy(), g_emb.contiguous().numpy(), g_lin.contiguous().numpy())
            return grad, None, None
        if g_emb is not None:
            grad[:, :d].index_add_(0, idx, g_emb)
        if g_lin is not None:
            grad[:, d].index_add_(0, idx, g_lin)
        return grad, None, None


@numba.njit(nogil=True, cache=True)
def _split_add(grad: np.ndarray, idx: np.ndarray, g_emb: np.ndarray, g_lin: np.ndarray) -> None:
    """``grad[idx[i], :d] += g_emb[i]`` and ``grad[idx[i], d] += g_lin[i]``, i ascending."""
    d = g_emb.shape[1]
    for i in range(len(idx)):
        u = idx[i]
        for j in range(d):
            grad[u, j] += g_emb[i, j]
        grad[u, d] += g_lin[i]


def split_gather(leaf: torch.Tensor, idx: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf[idx, :d], leaf[idx, d])``, each contiguous (see :class:`_SplitGather`).

    Args:
        leaf: float32 (U, d + 1) the batch's unique rows.
        idx: int64 (N,) rows to read.
    Returns:
        float32 (N, d) and float32 (N,).
    """
    return _SplitGather.apply(leaf, idx, d)


def combine(x: torch.Tensor, op: str, linear_column: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combine each key's ``P`` partition rows (a compressed table's rows; also what its ONNX
    export computes).

    Args:
        x: float32 (..., P, W) the partition rows of each key.
        op: ``mult``, ``add``/``sum``, ``mean`` or ``concat`` (over the partitions).
        linear_column: the rows' last column is a first-order weight: it is averaged over the
            partitions by ``mean``, else summed whatever ``op`` (a product of weights that start at
            zero would never move).
    Returns:
        ``(emb, linear)``: float32 (..., D') with D' the embedding columns (``P`` times them by
        ``concat``), and float32 (...) or None.
    """
    lin = None
    if linear_column:
        lin = x[..., -1].mean(-1) if op == "mean" else x[..., -1].sum(-1)
        x = x[..., :-1]
    if op == "mult":
        emb = x.prod(-2)
    elif op in ("add", "sum"):
        emb = x.sum(-2)
    elif op == "mean":
        emb = x.mean(-2)
    elif op == "concat":
        emb = x.flatten(-2)
    else:
        raise ValueError(f"unknown op {op!r}")
    return emb, lin


def combine_parts(leaf: torch.Tensor, idx: torch.Tensor, parts: int, op: str,
                  linear_column: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`combine` of the rows ``idx`` reads: int64 (N * P,), key-major (key ``n``'s
    partition ``p`` at ``n * P + p``), from the batch's unique rows ``leaf`` float32 (U, W).

    Returns:
        float32 (N, D') and float32 (N,) or None.
    """
    return combine(leaf.index_select(0, idx).view(-1, parts, leaf.shape[1]), op, linear_column)
