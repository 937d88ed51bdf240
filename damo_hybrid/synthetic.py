"""Synthetic Criteo-like ids: Zipf-distributed ranks hashed into keys."""

from __future__ import annotations

import numpy as np

from .hashing import hash_feature

__all__ = ["zipf_ranks", "zipf_keys"]


def zipf_ranks(rng: np.random.Generator, n: int, vocab: int, a: float = 1.1) -> np.ndarray:
    """Ranks in ``[0, vocab)`` with ``P(r) ~ (r + 1) ** -a``.

    Uses the inverse CDF of the continuous power law on ``[1, vocab + 1)``,
    so it is vectorized and bounded.

    Args:
        rng: numpy generator.
        n: how many.
        vocab: number of distinct ranks.
        a: exponent (> 0, != 1).
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
