"""Synthetic Criteo-like data: Zipf-distributed ids, dense counts, and learnable labels.

Every batch is a pure function of ``(seed, batch index)``, so a resumed run sees the same
data. The label of a sample is drawn from ``sigmoid(logit)`` where the logit sums a hidden
weight per (field, id) (itself a hash of the pair, never stored) and a linear term of the
dense features: a model that learns per-id embeddings can reach a meaningful AUC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..keys.hashing import hash_feature, mix64

__all__ = ["zipf_ranks", "zipf_keys", "SyntheticCriteo", "Batch"]


def zipf_ranks(rng: np.random.Generator, n: int, vocab: int, a: float = 1.1) -> np.ndarray:
    """Ranks in ``[0, vocab)`` with ``P(r) ~ (r + 1) ** -a`` (inverse CDF of the continuous law).

    Returns:
        int64 (n,).
    """
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    if a <= 0 or a == 1.0:
        raise ValueError(f"a must be > 0 and != 1, got {a}")
    u = rng.random(n)
    e = 1.0 - a
    top = (vocab + 1.0) ** e
    r = (1.0 + u * (top - 1.0)) ** (1.0 / e)
    return np.minimum(r.astype(np.int64) - 1, vocab - 1)


def zipf_keys(rng: np.random.Generator, n: int, vocab: int, field: str | int = 0, a: float = 1.1) -> np.ndarray:
    """uint64 (n,) keys: Zipf ranks of one field, feature-hashed."""
    return hash_feature(field, zipf_ranks(rng, n, vocab, a))


@dataclass
class Batch:
    """One batch.

    Attributes:
        sparse: field name -> uint64 (B,) keys.
        dense: float32 (B, n_dense), already log-transformed.
        label: float32 (B,) in {0, 1}.
    """

    sparse: dict[str, np.ndarray]
    dense: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


class SyntheticCriteo:
    """26 categorical fields (C1..C26) with Zipf(a) ids and 13 dense fields (I1..I13).

    Args:
        batch_size: samples per batch.
        seed: data seed.
        vocab_min, vocab_max: per-field vocabularies, log-spaced between these.
        n_sparse, n_dense: field counts.
        a: Zipf exponent.
        signal: scale of the hidden per-id weights (higher: easier labels).
        split: sampling stream; train and held-out data share ``seed`` (the hidden model)
            and differ in ``split``.
    """

    def __init__(self, batch_size: int = 4096, seed: int = 0, vocab_min: int = 10**6, vocab_max: int = 10**7,
                 n_sparse: int = 26, n_dense: int = 13, a: float = 1.1, signal: float = 1.0,
                 split: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= vocab_min <= vocab_max:
            raise ValueError(f"need 1 <= vocab_min <= vocab_max, got {vocab_min}, {vocab_max}")
        self.batch_size, self.seed, self.a, self.signal, self.split = batch_size, seed, a, signal, split
        self.sparse_fields = [f"C{i + 1}" for i in range(n_sparse)]
        self.dense_fields = [f"I{i + 1}" for i in range(n_dense)]
        self.vocab = np.geomspace(vocab_min, vocab_max, max(n_sparse, 1)).astype(np.int64)[:n_sparse]
        self._dense_w = np.random.default_rng([seed, 7]).normal(0, 0.3, n_dense)
        from ..resources import check_fits  # one batch: its keys, dense values and their float64 temporaries

        check_fits([(f"one batch of batch_size {batch_size:,}", batch_size * (24 * n_sparse + 20 * n_dense + 40))],
                   "lower batch_size (CLI: --batch-size)", "synthetic data")

    def batch(self, index: int) -> Batch:
        """Batch number ``index`` (deterministic)."""
        rng = np.random.default_rng([self.seed, self.split, index])
        b = self.batch_size
        logit = np.full(b, -1.0)
        sparse = {}
        for i, f in enumerate(self.sparse_fields):
            ranks = zipf_ranks(rng, b, int(self.vocab[i]), self.a)
            sparse[f] = hash_feature(f, ranks)
            # hidden weight of (field, id): a centred uniform from a hash of the key
            h = mix64(sparse[f] ^ mix64(np.uint64(self.seed))[0])
            logit += self.signal * ((h >> np.uint64(11)).astype(np.float64) / 2.0**53 - 0.5) * 2.0 / np.sqrt(len(self.sparse_fields) / 4)
        counts = rng.lognormal(1.0, 1.2, (b, len(self.dense_fields)))
        dense = np.log1p(counts).astype(np.float32)
        logit += (dense - 1.2) @ self._dense_w
        label = (rng.random(b) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        return Batch(sparse, dense, label)
