"""CTR models whose sparse part is an :class:`~damo_hybrid.nn.EmbeddingCollection`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .nn import EmbeddingCollection, Feature, PreparedBatch
from .store import EmbeddingStore

__all__ = ["DeepFM", "mlp"]


def mlp(sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU stack; the last layer has no activation."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DeepFM(nn.Module):
    """DeepFM (Guo et al. 2017): first-order weights + FM pairwise term + MLP over embeddings.

    Sparse rows live in two store tables: ``emb_table`` (dim ``dim``, the FM/deep embeddings)
    and ``lin_table`` (dim 1, the first-order weights), shared by all fields (keys are
    field-salted by :func:`~damo_hybrid.hashing.hash_feature`).

    Args:
        store: an open store holding both tables.
        fields: categorical field names (the keys of the sparse input).
        n_dense: number of dense features.
        hidden: MLP hidden sizes.
        cache_mb: host-cache budget for the sparse tables.
    """

    def __init__(self, store: EmbeddingStore, fields: Sequence[str], n_dense: int, hidden: Sequence[int] = (400, 400),
                 emb_table: str = "emb", lin_table: str = "lin", cache_mb: float = 256.0,
                 min_cache_rows: int = 1 << 16) -> None:
        super().__init__()
        self.fields = list(fields)
        feats = [Feature(f, emb_table) for f in self.fields] + [Feature(f"{f}#lin", lin_table) for f in self.fields]
        self.sparse = EmbeddingCollection(store, feats, cache_mb=cache_mb, min_cache_rows=min_cache_rows)
        self.dim = self.sparse.dims[self.fields[0]]
        self.dense_linear = nn.Linear(n_dense, 1)
        self.deep = mlp([len(self.fields) * self.dim + n_dense, *hidden, 1])

    def inputs(self, sparse: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw sparse keys -> the collection's inputs (each field feeds two tables)."""
        out = dict(sparse)
        out.update({f"{f}#lin": sparse[f] for f in self.fields})
        return out

    def prepare(self, sparse: Mapping[str, np.ndarray]) -> PreparedBatch:
        return self.sparse.prepare(self.inputs(sparse))

    def forward(self, batch: PreparedBatch, dense: torch.Tensor) -> torch.Tensor:
        """Logits, float32 (B,)."""
        out = self.sparse(batch)
        e = torch.stack([out[f] for f in self.fields], dim=1)  # (B, F, D)
        first = torch.cat([out[f"{f}#lin"] for f in self.fields], dim=1).sum(1) + self.dense_linear(dense).squeeze(1)
        s = e.sum(1)
        fm = 0.5 * (s * s - (e * e).sum(1)).sum(1)
        deep = self.deep(torch.cat([e.flatten(1), dense], 1)).squeeze(1)
        return first + fm + deep

    def apply_sparse_gradients(self) -> None:
        self.sparse.apply_gradients()
