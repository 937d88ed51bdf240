"""The in-memory baseline every comparison trains against: rows in ``nn.Embedding(sparse=True)``.

:class:`InMemoryEmbeddings` serves a model's per-field embeddings from one in-memory table per
kind (``emb`` of width D, ``lin`` of width 1 for the first-order term), indexed by a function
of the keys (keys modulo the table size, or positions in an exact vocabulary). Passed as a
model's ``embedding_module``, it makes the package's own model class the baseline, so both
sides of a benchmark run the very same dense modules. :func:`train_in_memory` is the plain
loop that trains it: ``torch.optim.Adagrad`` on the rows, Adam on the dense layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.synthetic import Batch

__all__ = ["InMemoryEmbeddings", "modulo_index", "vocab_index", "train_in_memory"]


def modulo_index(rows: int) -> Callable[[np.ndarray], np.ndarray]:
    """Keys -> row ``key mod rows`` (a hashed table that must fit in memory)."""
    return lambda keys: (keys % np.uint64(rows)).astype(np.int64)


def vocab_index(vocab: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Keys -> their position in a sorted exact vocabulary (no collisions)."""
    return lambda keys: np.searchsorted(vocab, keys).astype(np.int64)


class InMemoryEmbeddings(nn.Module):
    """Per-field embeddings from in-memory tables.

    Args:
        fields: the model's categorical fields, in order.
        rows: rows of each table.
        dim: embedding width.
        index: keys uint64 (B,) -> int64 (B,) row indices.
        lin: also a width-1 first-order table.
        device: where the tables live.
        init: float32 (rows, dim) initial rows of ``emb`` (default normal, std 0.01); ``lin``
            starts at zero.
    """

    def __init__(self, fields: Sequence[str], rows: int, dim: int, index: Callable[[np.ndarray], np.ndarray],
                 lin: bool, device: torch.device | str = "cpu", init: np.ndarray | None = None) -> None:
        super().__init__()
        self.fields, self.dim, self.index = list(fields), dim, index
        self.device = torch.device(device)
        self.emb = nn.Embedding(rows, dim, sparse=True, device=self.device)
        self.lin = nn.Embedding(rows, 1, sparse=True, device=self.device) if lin else None
        with torch.no_grad():
            if init is None:
                nn.init.normal_(self.emb.weight, std=0.01)
            else:
                self.emb.weight.copy_(torch.from_numpy(init))
            if self.lin is not None:
                self.lin.weight.zero_()

    def prepare(self, sparse: Mapping[str, np.ndarray]) -> torch.Tensor:
        """int64 (B, F) row indices on the tables' device."""
        idx = np.stack([self.index(sparse[f]) for f in self.fields], 1)
        return torch.from_numpy(idx).to(self.device, non_blocking=True)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(e (B, F, D), first-order sum (B,) or None)``."""
        return self.emb(idx), (self.lin(idx).squeeze(2).sum(1) if self.lin is not None else None)

    def table_bytes(self) -> int:
        """Bytes of the rows and their Adagrad state."""
        n = self.emb.weight.numel() + (self.lin.weight.numel() if self.lin is not None else 0)
        return 2 * 4 * n


def train_in_memory(model: Any, batch: Callable[[int], Batch], steps: int, lr: float, dense_lr: float = 1e-3,
                    on_step: Callable[[float], None] | None = None) -> float:
    """Train a model built with an :class:`InMemoryEmbeddings` for ``steps`` batches.

    Adagrad (eps 1e-10, as the store's) on the rows, Adam on the dense layers. Each step is timed
    from the index lookup to the loss on the host (batches are built outside the timed part,
    as the damo_hybrid side builds them in its loader thread).

    Args:
        model: the model; its ``rows`` is the in-memory module.
        batch: batch index -> batch.
        on_step: called with each step's seconds.
    Returns:
        The last loss.
    """
    rows = model.rows
    dev = rows.device
    sparse_opt = torch.optim.Adagrad(list(rows.parameters()), lr=lr, eps=1e-10)
    dense_opt = torch.optim.Adam(model.dense_parameters(), lr=dense_lr)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    loss = float("nan")
    for i in range(steps):
        b = batch(i)
        t0 = time.perf_counter()
        out = model(model.prepare(b.sparse), torch.from_numpy(b.dense).to(dev))
        lv = loss_fn(out, torch.from_numpy(b.label).to(dev))
        sparse_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        lv.backward()
        sparse_opt.step()
        dense_opt.step()
        loss = float(lv.detach())  # the step is done when its loss is on the host
        if on_step is not None:
            on_step(time.perf_counter() - t0)
    return loss
