"""The ``torch.nn.Module`` users put in their models: embeddings whose rows live on disk.

:class:`EmbeddingCollection` looks up many categorical features at once. Each feature reads
one table; several features may share a table. Per table, a batch's keys are de-duplicated,
made resident in the table's :class:`~damo_hybrid.host_cache.HostCache` (pinned until the
step is applied) and copied into one leaf tensor of the batch's unique rows. Autograd then
sums every occurrence's gradient into that leaf, and :meth:`EmbeddingCollection.apply_gradients`
steps each unique row once with the table's sparse optimizer, after ``loss.backward()``,
like ``optimizer.step()``.

Example:
    >>> emb = EmbeddingCollection(store, [Feature("user", "user"), Feature("tags", "tag", pooling="mean")],
    ...                           cache_mb=512)                                  # doctest: +SKIP
    >>> out = emb({"user": user_keys, "tags": (tag_keys, tag_offsets)})          # doctest: +SKIP
    >>> loss = model_head(out).mean(); loss.backward()                           # doctest: +SKIP
    >>> emb.apply_gradients(); dense_opt.step()                                  # doctest: +SKIP

Thread safety: one batch in flight per module unless :meth:`prepare` is driven by a pipeline
that serialises cache access (the host manager), as the trainer does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from .hashing import as_keys
from .host_cache import HostCache
from .store import EmbeddingStore

__all__ = ["Feature", "EmbeddingCollection", "PreparedBatch"]

# a single-valued feature: uint64 (B,); a multi-valued one: (values uint64 (L,), offsets int64 (B + 1,))
FeatureInput = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Feature:
    """One categorical input.

    Attributes:
        name: the key of this feature in the input dict and in the output.
        table: the store table holding its rows.
        pooling: ``None`` for one key per sample; ``"sum"`` or ``"mean"`` for a bag of keys
            per sample (input given as ``(values, offsets)``).
    """

    name: str
    table: str
    pooling: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in (None, "sum", "mean"):
            raise ValueError(f"pooling must be None, 'sum' or 'mean', got {self.pooling!r}")


@dataclass
class _TableBatch:
    ukeys: np.ndarray  # uint64 (U,)
    slots: np.ndarray  # int64 (U,) pinned
    inverse: dict[str, np.ndarray] = field(default_factory=dict)  # feature -> int64 index into ukeys
    offsets: dict[str, np.ndarray] = field(default_factory=dict)  # bag features only
    leaf: torch.Tensor | None = None


@dataclass
class PreparedBatch:
    """A batch whose rows are resident and pinned (made by :meth:`EmbeddingCollection.prepare`)."""

    batch_size: int
    tables: dict[str, _TableBatch]
    applied: bool = False


class EmbeddingCollection(torch.nn.Module):
    """Disk-backed embeddings for many features.

    Args:
        store: the open store holding every table named by ``features``.
        features: the inputs, in output order.
        cache_mb: host-cache budget shared by the tables in proportion to their row bytes
            (at least ``min_cache_rows`` rows each).
        min_cache_rows: floor per table (a batch's distinct keys plus the pinned rows of the
            batches in flight must fit).
    """

    def __init__(self, store: EmbeddingStore, features: Sequence[Feature], cache_mb: float = 256.0,
                 min_cache_rows: int = 1 << 16) -> None:
        super().__init__()
        if not features:
            raise ValueError("features must not be empty")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names in {names}")
        if cache_mb <= 0:
            raise ValueError(f"cache_mb must be > 0, got {cache_mb}")
        self.store = store
        self.features = list(features)
        tables = sorted({f.table for f in features})
        per_row = {}
        for t in tables:
            _, opt = store.table_ops(t)
            per_row[t] = HostCache.nbytes_per_row(opt.dim, opt.width)
        budget = cache_mb * 2**20
        share = budget / sum(per_row.values())  # equal row counts; bytes follow the row size
        self.caches = {t: HostCache(store, t, max(min_cache_rows, int(share))) for t in tables}
        self.dims = {f.name: self.caches[f.table].dim for f in features}
        self._pooling = {f.name: f.pooling for f in features}
        self._pending: PreparedBatch | None = None

    # -------------------------------------------------------------- stage 2
    def prepare(self, inputs: Mapping[str, FeatureInput]) -> PreparedBatch:
        """De-duplicate keys per table and make their rows resident (pinned).

        Args:
            inputs: feature name -> uint64 (B,) keys, or (values uint64 (L,), offsets int64 (B + 1,)).
        Returns:
            A batch to pass to :meth:`forward`; its pins are released by :meth:`apply_gradients`
            or :meth:`release`.
        """
        missing = [f.name for f in self.features if f.name not in inputs]
        if missing:
            raise KeyError(f"inputs lack features {missing}")
        per_table: dict[str, list[tuple[Feature, np.ndarray, np.ndarray | None]]] = {}
        batch_size = None
        for f in self.features:
            x = inputs[f.name]
            if f.pooling is None:
                if isinstance(x, tuple):
                    raise TypeError(f"feature {f.name!r} has no pooling: give uint64 (B,) keys, not (values, offsets)")
                keys, offs = as_keys(x, f.name), None
                b = len(keys)
            else:
                if not (isinstance(x, tuple) and len(x) == 2):
                    raise TypeError(f"feature {f.name!r} pools a bag: give (values uint64 (L,), offsets int64 (B + 1,))")
                keys = as_keys(x[0], f"{f.name} values")
                offs = np.asarray(x[1], dtype=np.int64)
                if offs.ndim != 1 or len(offs) < 1 or offs[0] != 0 or offs[-1] != len(keys) or (np.diff(offs) < 0).any():
                    raise ValueError(f"offsets of {f.name!r} must rise from 0 to len(values) = {len(keys)}")
                b = len(offs) - 1
            if batch_size is None:
                batch_size = b
            elif b != batch_size:
                raise ValueError(f"feature {f.name!r} has batch size {b}, others {batch_size}")
            per_table.setdefault(f.table, []).append((f, keys, offs))
        tables: dict[str, _TableBatch] = {}
        dedup: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        try:
            for t, items in per_table.items():
                # tables fed by the very same key arrays (DeepFM's emb and lin) share one de-duplication
                ident = tuple(id(k) for _, k, _ in items)
                if ident not in dedup:
                    dedup[ident] = np.unique(np.concatenate([k for _, k, _ in items]), return_inverse=True)
                ukeys, inv = dedup[ident]
                slots = self.caches[t].make_resident(ukeys, pin=True)
                tb = _TableBatch(ukeys, slots)
                tables[t] = tb
                start = 0
                for f, k, offs in items:
                    tb.inverse[f.name] = inv[start:start + len(k)]
                    if offs is not None:
                        tb.offsets[f.name] = offs
                    start += len(k)
        except BaseException:
            for t, tb in tables.items():
                self.caches[t].unpin(tb.slots)
            raise
        return PreparedBatch(int(batch_size or 0), tables)

    # -------------------------------------------------------------- stage 3
    def forward(self, batch: PreparedBatch | Mapping[str, FeatureInput]) -> dict[str, torch.Tensor]:
        """Embeddings per feature.

        Args:
            batch: a :class:`PreparedBatch`, or raw inputs (then prepared here).
        Returns:
            feature name -> float32 tensor (B, dim) (pooled for bag features).
        """
        if not isinstance(batch, PreparedBatch):
            batch = self.prepare(batch)
        if self._pending is not None and self._pending is not batch and not self._pending.applied:
            raise RuntimeError("the previous batch's gradients were not applied: call apply_gradients() "
                               "(or release()) after each backward pass")
        self._pending = batch
        out: dict[str, torch.Tensor] = {}
        for t, tb in batch.tables.items():
            cache = self.caches[t]
            leaf = torch.from_numpy(cache.weights[tb.slots]).requires_grad_(self.training)
            tb.leaf = leaf
            for name, inv in tb.inverse.items():
                idx = torch.from_numpy(inv)
                if name in tb.offsets:
                    out[name] = torch.nn.functional.embedding_bag(
                        idx, leaf, torch.from_numpy(tb.offsets[name][:-1]), mode=self._pooling[name])
                else:
                    out[name] = leaf.index_select(0, idx)
        return {f.name: out[f.name] for f in self.features}

    def apply_gradients(self, step: int | None = None) -> None:
        """Step every row of the last batch once with its table's optimizer, then unpin them.

        Rows that received no gradient (the loss did not depend on them) are not stepped.
        """
        batch = self._pending
        if batch is None or batch.applied:
            raise RuntimeError("no batch to apply: run forward() and backward() first")
        try:
            for t, tb in batch.tables.items():
                cache = self.caches[t]
                if tb.leaf is None or tb.leaf.grad is None:
                    continue
                g = np.ascontiguousarray(tb.leaf.grad.numpy(), dtype=np.float32)
                keys, g2, lr = self.store.begin_step(t, tb.ukeys, g, step)
                if len(keys) != len(tb.ukeys):  # skip policy dropped non-finite rows
                    keep = np.isin(tb.ukeys, keys)
                    cache.step_slots(tb.slots[keep], g2, lr)
                else:
                    cache.step_slots(tb.slots, g2, lr)
                self.store.end_step(t)
        finally:
            self.release(batch)

    def release(self, batch: PreparedBatch | None = None) -> None:
        """Unpin a batch's rows without applying anything."""
        batch = batch or self._pending
        if batch is None or batch.applied:
            return
        for t, tb in batch.tables.items():
            self.caches[t].unpin(tb.slots)
            tb.leaf = None
        batch.applied = True

    def flush(self) -> None:
        """Write every dirty cached row back to the store and flush it."""
        for c in self.caches.values():
            c.flush()

    def cache_stats(self) -> dict[str, object]:
        """Per-table :class:`~damo_hybrid.host_cache.CacheStats`."""
        return {t: c.stats for t, c in self.caches.items()}
