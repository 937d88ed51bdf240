"""Tables sharded by key over ranks: the :class:`~damo_hybrid.nn.EmbeddingCollection` API,
served by the rank that owns each row.

Every rank opens its own store (its own RocksDB directory and cache tiers) and owns the keys
:func:`~damo_hybrid.dist.sharding.shard_of` gives it; only the owner reads or writes their rows.
A step of :class:`ShardedEmbeddingCollection`, with ``W`` ranks:

1. ``prepare`` (the host-manager stage): each rank de-duplicates its batch's keys per table and
   sends each unique key to its owner (all-to-all); the owner de-duplicates them again, across
   ranks, and makes their rows resident and pinned in its tiers: a local
   :class:`~damo_hybrid.nn.EmbeddingCollection` over the keys it was sent.
2. ``forward``: each owner gathers the rows it was asked for and sends them back (all-to-all);
   a rank's features read its unique rows, a leaf of autograd.
3. ``apply_gradients``: each rank sends its unique rows' gradients to their owners (all-to-all);
   the owner sums them over ranks (its local collection's autograd), divides by ``W`` and steps
   each key once.

The ``1 / W`` matches data-parallel training of the dense layers (gradients averaged over
ranks): the Trainer weights each rank's mean loss by ``W n_r / N`` (its ``n_r`` of the global
batch's ``N`` rows), so a run on ``W`` ranks equals one process on the global batch up to the
order of float additions, however unevenly the batch is split.

Rows are read at step time (2.), after every owner applied the previous step (3.), so a key
shared by steps ``t`` and ``t + 1`` on any ranks sees ``t``'s update in ``t + 1``. Stage 1 may run
in the host-manager thread while stages 2 and 3 of the previous batch run in the worker: each has
its own process group, so their collectives never interleave; every rank runs the same batches in
the same order.

Bag features (``pooling="sum"`` or ``"mean"``, input ``(values, offsets)``) travel as their
values' unique keys, like single-valued ones; the asking rank pools its rows
(``embedding_bag``), so the gradient of each value reaches its owner summed. Compressed tables
are not sharded yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..cache.host import CacheStats
from ..keys.kernels import unique_inverse
from ..nn.collection import EmbeddingCollection, Feature, FeatureInput, PreparedBatch, bag_input, refuse_unapplied
from ..nn.gather import TableOutput
from ..store import EmbeddingStore
from .exchange import Exchange
from .sharding import claim_shard, split_by_owner

__all__ = ["ShardedEmbeddingCollection", "ShardedBatch"]


@dataclass
class _Shard:
    """One table's part of a sharded batch, on the rank that asked."""

    table: str
    gather: torch.Tensor  # int64 (sum of the features' keys,) each key's row among the keys sent (feature-major)
    send_counts: np.ndarray  # int64 (W,) unique keys sent to each owner
    recv_counts: np.ndarray  # int64 (W,) keys each rank sent this one (as owner)
    local: PreparedBatch | None  # the owner's side: the keys it serves, resident and pinned
    leaf: torch.Tensor | None = None  # (U, dim) the rows received, in send order
    served: torch.Tensor | None = None  # (sum recv_counts, dim) the rows this rank served
    # per feature: (name, first key in gather, keys, bag starts int64 (B,) or None); None when
    # every feature of the table is single-valued (one gather of (B, F_t, dim))
    parts: list[tuple[str, int, int, torch.Tensor | None]] | None = None


@dataclass
class ShardedBatch:
    """A batch whose rows are resident and pinned on their owners (:meth:`ShardedEmbeddingCollection.prepare`)."""

    batch_size: int
    tables: dict[str, _Shard] = field(default_factory=dict)
    applied: bool = False


class ShardedEmbeddingCollection(torch.nn.Module):
    """An :class:`~damo_hybrid.nn.EmbeddingCollection` whose tables are split over the ranks of
    the default process group (see the module doc). Every rank builds it with the same features.

    Args:
        store: this rank's own store (its shard of every table).
        features: in output order; single-valued, or bags (``pooling``).
        cache_mb, min_cache_rows, backend, device_cache_mb: as for the local collection.
        timeout: seconds an exchange waits for the other ranks before it raises
            :class:`~damo_hybrid.errors.ExchangeError` (a rank that died is usually reported
            at once: its sockets close).
    Raises:
        ValueError: a compressed table (not sharded yet), or no process group.
    """

    def __init__(self, store: EmbeddingStore, features: Sequence[Feature], cache_mb: float | None = None,
                 min_cache_rows: int | None = None, backend: str = "auto", device_cache_mb: float | None = None,
                 timeout: float = 300.0) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("a ShardedEmbeddingCollection needs torch.distributed initialised (init_process_group)")
        self.store, self.features = store, list(features)
        tables = list(dict.fromkeys(f.table for f in features))
        self._by_table = {t: [f.name for f in features if f.table == t] for t in tables}
        self._pooling = {f.name: f.pooling for f in features}
        # the owner's side: one local collection per table, over the keys the ranks send it
        self.local = {t: EmbeddingCollection(store, [Feature(t, t)], cache_mb=cache_mb, min_cache_rows=min_cache_rows,
                                             backend=backend, device_cache_mb=device_cache_mb) for t in tables}
        comp = [t for t, c in self.local.items() if c.tiers[t].table.cfg.compression is not None]
        if comp:
            raise ValueError(f"tables {comp} are compressed: a sharded collection serves plain tables only")
        first = next(iter(self.local.values()))
        self.device, self.backend = first.device, first.backend
        self.tiers = {t: c.tiers[t] for t, c in self.local.items()}
        self.dims = {f.name: self.tiers[f.table].table.cfg.dim for f in features}
        # one group per pipeline stage that exchanges (prepare: the host manager; the step: the
        # worker); a rank that stops makes the others' next exchange fail within ``timeout``
        wait = timedelta(seconds=timeout)
        self._prep = Exchange(dist.new_group(backend=dist.get_backend(), timeout=wait), "key exchange", wait)
        self._step = Exchange(dist.new_group(backend=dist.get_backend(), timeout=wait), "row exchange", wait)
        self.world, self.rank = self._step.world, self._step.rank
        claim_shard(store.root, self.world, self.rank)
        self._pending: ShardedBatch | None = None

    # ------------------------------------------------------ host manager
    def prepare(self, inputs: Mapping[str, FeatureInput]) -> ShardedBatch:
        """De-duplicate each table's keys, send them to their owners and make them resident there.

        Args:
            inputs: feature name -> uint64 (B,) keys, or (values uint64 (L,), offsets int64 (B + 1,))
                for a bag feature.
        """
        missing = [f.name for f in self.features if f.name not in inputs]
        if missing:
            raise KeyError(f"inputs lack features {missing}")
        keys_of, offsets_of = {}, {}
        for f in self.features:
            keys_of[f.name], offsets_of[f.name] = bag_input(f, inputs[f.name])
        sizes = {len(keys_of[n]) if o is None else len(o) - 1 for n, o in offsets_of.items()}
        if len(sizes) != 1:
            raise ValueError(f"every feature needs the same batch size, got {sorted(sizes)}")
        b = sizes.pop()
        gathers, sends, counts, parts_of = {}, [], [], {}
        for t, feats in self._by_table.items():
            if any(offsets_of[f] is not None for f in feats):
                parts, start = [], 0
                for f in feats:
                    o = offsets_of[f]
                    parts.append((f, start, len(keys_of[f]), None if o is None else torch.from_numpy(o[:-1])))
                    start += len(keys_of[f])
                parts_of[t] = parts
            ukeys, inverse = unique_inverse(np.concatenate([keys_of[f] for f in feats]))
            order, n = split_by_owner(ukeys, self.world)
            pos = np.empty(len(ukeys), np.int64)
            pos[order] = np.arange(len(ukeys))
            gathers[t] = torch.from_numpy(pos[inverse.reshape(-1)])
            sends.append(ukeys[order])
            counts.append(n)
        send_counts = np.stack(counts, 1)  # (W, T)
        recv_counts = self._prep.counts(send_counts)
        # one exchange of every table's keys: to each rank, table by table
        by_rank = [np.concatenate([s[send_counts[:r, i].sum():send_counts[:r + 1, i].sum()]
                                   for i, s in enumerate(sends)]) for r in range(self.world)]
        got = self._prep.send(torch.from_numpy(np.concatenate(by_rank).view(np.int64)),
                              send_counts.sum(1), recv_counts.sum(1)).numpy().view(np.uint64)
        batch = ShardedBatch(b)
        starts = np.concatenate([[0], np.cumsum(recv_counts.sum(1))])
        for i, t in enumerate(self._by_table):
            # the keys of table t from each rank: after that rank's keys of the tables before t
            parts = [got[starts[r] + recv_counts[r, :i].sum():starts[r] + recv_counts[r, :i + 1].sum()]
                     for r in range(self.world)]
            mine = np.concatenate(parts)
            local = self.local[t].prepare({t: mine}) if len(mine) else None
            batch.tables[t] = _Shard(t, gathers[t], send_counts[:, i], recv_counts[:, i], local,
                                     parts=parts_of.get(t))
        return batch

    # ------------------------------------------------------------- worker
    def forward_tables(self, batch: ShardedBatch | Mapping[str, FeatureInput]) -> dict[str, TableOutput]:
        """Per table, ``emb`` (B, F_t, D) and ``linear`` (B, F_t) or None, as
        :meth:`EmbeddingCollection.forward_tables`: the owners serve the rows at step time.

        Raises:
            ValueError: a table has a bag feature (use :meth:`forward`).
        """
        bags = sorted({f.table for f in self.features if f.pooling is not None})
        if bags:
            raise ValueError(f"tables {bags} have bag features: use forward() for per-feature outputs")
        return self._rows(batch)  # type: ignore[return-value]

    def _rows(self, batch: ShardedBatch | Mapping[str, FeatureInput]) -> dict[str, Any]:
        """The owners' rows at step time: per table a :class:`TableOutput` when its features are
        single-valued, else a dict of feature -> (B, dim) (bags pooled)."""
        if not isinstance(batch, ShardedBatch):
            batch = self.prepare(batch)
        train = self.training and torch.is_grad_enabled()
        refuse_unapplied(self, batch, train)
        out: dict[str, TableOutput] = {}
        for t, sh in batch.tables.items():
            cfg = self.tiers[t].table.cfg
            local = self.local[t]
            local.train(self.training)
            if sh.local is not None:
                served = local.forward(sh.local)[t]
            else:
                served = torch.zeros((0, cfg.dim), dtype=torch.float32, device=self.device)
            sh.served = served if train else None
            rows = self._step.send(served.detach(), sh.recv_counts, sh.send_counts)
            sh.leaf = rows.requires_grad_(train)
            if sh.parts is not None:
                gather = sh.gather.to(rows.device)
                per: dict[str, torch.Tensor] = {}
                for name, start, n, offs in sh.parts:
                    idx = gather[start:start + n]
                    per[name] = sh.leaf.index_select(0, idx) if offs is None else torch.nn.functional.embedding_bag(
                        idx, sh.leaf, offs.to(rows.device), mode=self._pooling[name])
                out[t] = per
                continue
            nf = len(self._by_table[t])
            x = sh.leaf.index_select(0, sh.gather.to(rows.device)).view(nf, batch.batch_size, cfg.dim).transpose(0, 1)
            out[t] = TableOutput(x[..., :-1], x[..., -1]) if cfg.linear_column else TableOutput(x, None)
        if train:
            self._pending = batch
        return out

    def forward(self, batch: ShardedBatch | Mapping[str, FeatureInput]) -> dict[str, torch.Tensor]:
        """feature -> (B, dim) rows (the full row, first-order column included; bags pooled)."""
        x = self._rows(batch)
        res = {}
        for t, feats in self._by_table.items():
            o = x[t]
            if isinstance(o, dict):
                res.update(o)
                continue
            full = o.emb if o.linear is None else torch.cat([o.emb, o.linear.unsqueeze(-1)], -1)
            res.update({f: full[:, i] for i, f in enumerate(feats)})
        return res

    def apply_gradients(self, step: int | None = None) -> None:
        """Send each unique row's gradient to its owner, which sums them over ranks, divides by
        the world size and steps each row once (its local collection's checks and policies)."""
        batch = self._pending
        if batch is None or batch.applied:
            raise RuntimeError("no batch to apply: run forward() and backward() first")
        try:
            for t, sh in batch.tables.items():
                assert sh.leaf is not None
                g = sh.leaf.grad if sh.leaf.grad is not None else torch.zeros_like(sh.leaf)
                mine = self._step.send(g.detach(), sh.send_counts, sh.recv_counts)
                if sh.local is not None and sh.served is not None:
                    sh.served.backward(mine / self.world)
                    self.local[t].apply_gradients(step)
                else:  # no rank sent this owner a key of t this step: its global step still counts it
                    self.tiers[t].table.advance()
        finally:
            self.release(batch)

    def release(self, batch: ShardedBatch | None = None) -> None:
        """Unpin a batch's rows on this rank (as owner) without applying anything."""
        batch = batch or self._pending
        if batch is None or batch.applied:
            return
        for t, sh in batch.tables.items():
            if sh.local is not None:
                self.local[t].release(sh.local)
            sh.leaf = sh.served = None
        batch.applied = True

    # ---------------------------------------------------------------- both
    @property
    def caches(self) -> dict[str, Any]:
        return {t: tr.host for t, tr in self.tiers.items()}

    @property
    def device_caches(self) -> dict[str, Any]:
        return {t: tr.device for t, tr in self.tiers.items() if tr.device is not None}

    def flush(self) -> None:
        """This rank's shard: every updated row down to its storage."""
        self.store.flush()

    def exchange_stats(self) -> dict[str, dict[str, float]]:
        """Since construction, per exchange group: bytes sent to other ranks, seconds in the
        all-to-alls and calls. ``prepare``: keys (and counts) to their owners; ``step``: rows back
        and gradients to the owners (as many bytes each)."""
        return {n: {"bytes_sent": e.bytes_sent, "seconds": e.seconds, "calls": e.calls}
                for n, e in (("prepare", self._prep), ("step", self._step))}

    def cache_stats(self) -> dict[str, CacheStats]:
        return {t: c.stats for t, c in self.caches.items()}

    def device_cache_stats(self) -> dict[str, CacheStats]:
        return {t: c.stats for t, c in self.device_caches.items()}
