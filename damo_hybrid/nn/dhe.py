"""Deep Hash Embedding (Kang et al., KDD 2021): embeddings without an embedding table.

Each key is encoded by ``k`` hash functions into a dense, fixed code (the "identifier vector"),
and an MLP decodes the code into the embedding. There is no row per id: the parameters are the
MLP's, ``O(k * hidden + hidden^2 * depth)`` whatever the vocabulary, and every id, new or old,
has an embedding. The cost moves from memory to compute: every distinct key of a batch runs
through the MLP.

- Encoding: hash ``i`` of key ``x`` is ``mix64(x ^ s_i) mod m`` (``s_i`` fixed seeds, ``m =
  10^6`` buckets as in the paper), mapped to ``[-1, 1]`` uniformly, or to a standard normal by
  Box-Muller over pairs of hashes (``dist="gaussian"``, the paper's better choice).
- Decoding: ``Linear -> LayerNorm -> Mish`` blocks, then a linear map to the embedding (plus one
  first-order weight for models that want it). The paper normalises with batch norm; layer norm
  gives the same output in training and eval and works for a batch of one distinct key.

:class:`DeepHashEmbedding` serves the built-in models as their ``embedding_module``: its
:meth:`~DeepHashEmbedding.prepare` (the host-manager stage) de-duplicates the batch's keys and
encodes them in numpy; its forward decodes each distinct key once and gathers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..keys.hashing import as_keys, mix64

__all__ = ["DeepHashEmbedding", "DHEBatch", "dhe_codes"]

_BUCKETS = 10**6


def dhe_codes(keys: np.ndarray, k: int, dist: str = "gaussian", seed: int = 0, buckets: int = _BUCKETS) -> np.ndarray:
    """The dense identifier vector of each key.

    Args:
        keys: uint64 (N,).
        k: hash functions (even for ``gaussian``).
        dist: ``uniform`` ([-1, 1]) or ``gaussian`` (Box-Muller over hash pairs).
    Returns:
        float32 (N, k).
    """
    seeds = mix64(np.arange(1, k + 1, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    h = mix64(np.asarray(keys, np.uint64)[:, None] ^ seeds[None, :]) % np.uint64(buckets)
    u = (h.astype(np.float64) + 0.5) / buckets  # (0, 1)
    if dist == "uniform":
        return (2.0 * u - 1.0).astype(np.float32)
    if dist != "gaussian":
        raise ValueError(f"dist must be 'uniform' or 'gaussian', got {dist!r}")
    a, b = u[:, 0::2], u[:, 1::2]
    r = np.sqrt(-2.0 * np.log(a))
    out = np.empty_like(u)
    out[:, 0::2], out[:, 1::2] = r * np.cos(2 * np.pi * b), r * np.sin(2 * np.pi * b)
    return out.astype(np.float32)


class DHEBatch(NamedTuple):
    """A batch prepared by :meth:`DeepHashEmbedding.prepare`."""

    codes: torch.Tensor  # float32 (U, k) the distinct keys' codes
    inverse: torch.Tensor  # int64 (B, F) each field's key's row in ``codes``


class DeepHashEmbedding(nn.Module):
    """Embeddings of many fields' keys from a shared DHE encoder-decoder.

    Args:
        fields: field names (the keys of the sparse input), in output order.
        dim: embedding width D.
        k: hash functions (the code's width; the paper uses 1024).
        hidden: the decoder's hidden widths.
        dist: ``gaussian`` or ``uniform`` code values.
        first_order: also decode a first-order weight per key (for DeepFM and Wide&Deep).
        seed: the hash seeds (fixed for the module's life: it is part of the model).
        init_std: the spread of the embeddings at the start (a table initializer's std).
    """

    def __init__(self, fields: Sequence[str], dim: int, k: int = 256, hidden: Sequence[int] = (256, 256),
                 dist: str = "gaussian", first_order: bool = True, seed: int = 0, init_std: float = 0.01) -> None:
        super().__init__()
        if dim < 1 or k < 2 or (dist == "gaussian" and k % 2):
            raise ValueError(f"need dim >= 1 and k >= 2 (even for gaussian codes), got dim={dim}, k={k}")
        if dist not in ("gaussian", "uniform"):
            raise ValueError(f"dist must be 'gaussian' or 'uniform', got {dist!r}")
        self.fields, self.dim, self.k, self.dist, self.seed = list(fields), dim, k, dist, seed
        self.first_order = first_order
        layers: list[nn.Module] = []
        width = k
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.Mish()]
            width = h
        out = nn.Linear(width, dim + (1 if first_order else 0))
        # embeddings start at a table's spread (``init_std``), not O(1): a model's pairwise terms
        # (DeepFM's FM, DLRM's dot products) would otherwise start with huge logits
        nn.init.normal_(out.weight, std=init_std / width ** 0.5)
        nn.init.zeros_(out.bias)
        self.decoder = nn.Sequential(*layers, out)

    def prepare(self, sparse: Mapping[str, np.ndarray]) -> DHEBatch:
        """De-duplicate and encode a batch's keys (numpy; the host-manager stage).

        Args:
            sparse: field -> uint64 keys (B,).
        """
        cols = [as_keys(sparse[f], f) for f in self.fields]
        ukeys, inv = np.unique(np.stack(cols, 1), return_inverse=True)
        return DHEBatch(torch.from_numpy(dhe_codes(ukeys, self.k, self.dist, self.seed)),
                        torch.from_numpy(inv.reshape(len(cols[0]), len(cols)).astype(np.int64)))

    def forward(self, batch: DHEBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(e (B, F, D), first-order sum (B,) or None)``: each distinct key decoded once."""
        dev = next(self.parameters()).device
        rows = self.decoder(batch.codes.to(dev))
        x = rows[batch.inverse.to(dev)]
        if not self.first_order:
            return x, None
        return x[..., :self.dim], x[..., self.dim].sum(1)

    def parameter_bytes(self) -> int:
        """Bytes of the module's parameters (float32): its whole "table"."""
        return 4 * sum(p.numel() for p in self.parameters())
