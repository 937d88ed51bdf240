"""The ``torch.nn.Module`` users put in their models: embeddings whose rows live on disk.

:class:`EmbeddingCollection` looks up many categorical features at once. Each feature reads
one table; several features may share a table. Per table, a batch's keys are de-duplicated,
made resident in the table's cache tiers (pinned until the step is applied) and copied into
one leaf tensor of the batch's unique rows. The tiers belong to the store
(:meth:`EmbeddingStore.cache <damo_hybrid.store.EmbeddingStore.cache>`): every collection over
a table shares them, so two collections never hold two copies of a row. Autograd then
sums every occurrence's gradient into that leaf, and :meth:`EmbeddingCollection.apply_gradients`
steps each unique row once with the table's sparse optimizer, after ``loss.backward()``,
like ``optimizer.step()``.

Example:
    >>> emb = EmbeddingCollection(store, [Feature("user", "user"), Feature("tags", "tag", pooling="mean")])
    ...                                                                          # doctest: +SKIP
    >>> out = emb({"user": user_keys, "tags": (tag_keys, tag_offsets)})          # doctest: +SKIP
    >>> loss = model_head(out).mean(); loss.backward()                           # doctest: +SKIP
    >>> emb.apply_gradients(); dense_opt.step()                                  # doctest: +SKIP

Backends (chosen once, at construction): ``cpu`` serves rows from the host tier and computes
on the CPU; ``cuda`` adds a :class:`~damo_hybrid.cache.device.DeviceCache` per table in GPU
memory in front of the host tier, and the outputs live on the GPU; ``auto`` picks ``cuda``
where CUDA and CuPy work, else ``cpu``.

Eval and inference: a forward in ``eval()`` mode or under ``torch.no_grad()`` pins nothing
beyond the call and needs no ``apply_gradients``/``release``.

Thread safety: :meth:`prepare` may run in the host-manager thread (it takes each table's tier
lock) while the worker thread runs :meth:`forward`, :meth:`apply_gradients` and
:meth:`release` on an earlier batch; one batch is trained at a time per collection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from ..cache.device import DeviceBatch, DeviceCache
from ..cache.host import CacheStats, HostCache
from ..cache.registry import DEFAULT_DEVICE_CACHE_MB
from ..cache.tiers import TableTiers
from ..config import TableConfig
from ..errors import DamoHybridError, StoreClosedError
from ..keys.hashing import as_keys
from ..keys.kernels import unique_inverse
from ..ops import Backend, resolve_backend
from ..store import EmbeddingStore
from ..timing import CLOCK
from .batch_keys import admit, partition_keys
from .gather import TableOutput, combine_parts, split_gather
from .step import stage_rows

__all__ = ["Feature", "EmbeddingCollection", "PreparedBatch", "TableOutput", "DEFAULT_DEVICE_CACHE_MB"]

_STACKED = "#stacked"  # the array name of a table's concatenated inverse indices

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
    table: str
    ukeys: np.ndarray  # uint64 (U,)
    slots: np.ndarray  # int64 (U,) pinned host-cache slots (host tier)
    inverse: dict[str, torch.Tensor] = field(default_factory=dict)  # feature -> int64 index into ukeys
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)  # bag features only: starts (B,)
    # a table of single-valued features only: their inverses sample-major (B * F,), one gather
    stacked: torch.Tensor | None = None
    device: DeviceBatch | None = None  # device tier: its pinned slots and uploaded indices
    leaf: torch.Tensor | None = None
    # admission: bool (U,) the keys made resident (None: all); the others' rows (initial or zeros);
    # the positions of both in ukeys (built once, for the forward and the sparse step)
    admitted: np.ndarray | None = None
    side: np.ndarray | None = None
    admitted_idx: torch.Tensor | None = None
    side_idx: torch.Tensor | None = None


@dataclass
class PreparedBatch:
    """A batch whose rows are resident and pinned (made by :meth:`EmbeddingCollection.prepare`)."""

    batch_size: int
    tables: dict[str, _TableBatch]
    applied: bool = False


def refuse_unapplied(coll: torch.nn.Module, batch: object, train: bool) -> None:
    """Before a training forward of ``batch``: raise (releasing ``batch``) where the collection's
    previous batch was neither applied nor released.

    Raises:
        RuntimeError: the previous batch's gradients were not applied.
    """
    pending = coll._pending  # type: ignore[attr-defined]
    if train and pending is not None and pending is not batch and not pending.applied:
        coll.release(batch)  # type: ignore[operator]
        raise RuntimeError("the previous batch's gradients were not applied: call apply_gradients() "
                           "(or release()) after each backward pass")


def _out_dim(cfg: TableConfig) -> int:
    """Width of a feature's output from a table (a compressed table's combined row)."""
    return cfg.dim if cfg.compression is None else cfg.compression.out_dim(cfg.dim, cfg.linear_column)


def bag_input(f: Feature, x: FeatureInput) -> tuple[np.ndarray, np.ndarray | None]:
    """A feature's input checked: ``(keys uint64 (B,), None)``, or for a bag feature ``(values
    uint64 (L,), offsets int64 (B + 1,))``.

    Raises:
        TypeError: single keys given for a bag feature, or a bag for a single-valued one.
        ValueError: offsets that do not rise from 0 to ``L``; keys as :func:`~damo_hybrid.keys.as_keys`.
    """
    if f.pooling is None:
        if isinstance(x, tuple):
            raise TypeError(f"feature {f.name!r} has no pooling: give uint64 (B,) keys, not (values, offsets)")
        return as_keys(x, f.name), None
    if not (isinstance(x, tuple) and len(x) == 2):
        raise TypeError(f"feature {f.name!r} pools a bag: give (values uint64 (L,), offsets int64 (B + 1,))")
    keys = as_keys(x[0], f"{f.name} values")
    offs = np.asarray(x[1], dtype=np.int64)
    if offs.ndim != 1 or len(offs) < 1 or offs[0] != 0 or offs[-1] != len(keys) or (np.diff(offs) < 0).any():
        raise ValueError(f"offsets of {f.name!r} must rise from 0 to len(values) = {len(keys)}")
    return keys, offs


class EmbeddingCollection(torch.nn.Module):
    """Disk-backed embeddings for many features.

    Args:
        store: the open store holding every table named by ``features``.
        features: the inputs, in output order.
        cache_mb: host-tier budget for this collection's tables, where it creates their
            tiers; default ``StoreConfig.cache_mb``. A table already cached (by another
            collection, say) keeps its tiers: the first creation wins.
        min_cache_rows: floor per table and tier; default ``StoreConfig.min_cache_rows``.
        backend: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see the module doc).
        device_cache_mb: device-tier budget, split like ``cache_mb``. Default:
            ``StoreConfig.device_cache_mb``, else none on the ``cpu`` backend and
            :data:`DEFAULT_DEVICE_CACHE_MB` on ``cuda``. Given with the ``cpu`` backend, the
            device tier runs in host memory (its logic without a GPU).

    Raises:
        ValueError: bad features or budgets, or ``backend="cuda"`` where CUDA is unavailable.
        ConfigConflictError: a table is cached already with another device tier.
    """

    def __init__(self, store: EmbeddingStore, features: Sequence[Feature], cache_mb: float | None = None,
                 min_cache_rows: int | None = None, backend: Backend | str = Backend.AUTO,
                 device_cache_mb: float | None = None) -> None:
        super().__init__()
        if not features:
            raise ValueError("features must not be empty")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names in {names}")
        if cache_mb is not None and not cache_mb > 0:
            raise ValueError(f"cache_mb must be > 0, got {cache_mb}")
        if device_cache_mb is not None and not device_cache_mb > 0:
            raise ValueError(f"device_cache_mb must be > 0, got {device_cache_mb}")
        self.backend = resolve_backend(backend)
        if self.backend is Backend.CUDA:
            self.device = torch.device("cuda", torch.cuda.current_device())
            tier_device: torch.device | None = self.device
        else:
            self.device = torch.device("cpu")
            with_tier = device_cache_mb is not None or store.config.device_cache_mb is not None
            tier_device = self.device if with_tier else None
        from ..dist.sharding import refuse_lone_shard  # here: dist builds on this module
        refuse_lone_shard(store.root)
        self.store = store
        self.features = list(features)
        self.tiers: dict[str, TableTiers] = store.cache(
            sorted({f.table for f in features}), cache_mb=cache_mb, device_cache_mb=device_cache_mb,
            device=tier_device, min_cache_rows=min_cache_rows)
        # compressed tables (quotient-remainder, binary code, ...): raw keys -> partition keys
        self._comp = {t: tr.table.cfg.compression for t, tr in self.tiers.items()}
        self.dims = {f.name: _out_dim(self.tiers[f.table].table.cfg) for f in features}
        self._pooling = {f.name: f.pooling for f in features}
        self._by_table: dict[str, list[str]] = {}  # table -> its features, in order (as prepare stacks them)
        for f in features:
            self._by_table.setdefault(f.table, []).append(f.name)
        self._pending: PreparedBatch | None = None

    def __getstate__(self) -> dict[str, object]:
        raise TypeError(
            "an EmbeddingCollection cannot be pickled or deep-copied: its rows live in the store on disk, "
            "not in the module. state_dict() holds only the dense weights; save the embeddings with "
            "store.checkpoint(dir) (or Trainer.checkpoint, which saves both), or store.export(path) for serving"
        )

    @property
    def caches(self) -> dict[str, HostCache]:
        """The host tier of each table (shared with every other user of the table)."""
        return {t: tr.host for t, tr in self.tiers.items()}

    @property
    def device_caches(self) -> dict[str, DeviceCache]:
        """The device tier of each table that has one."""
        return {t: tr.device for t, tr in self.tiers.items() if tr.device is not None}

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
            keys, offs = bag_input(f, inputs[f.name])
            b = len(keys) if offs is None else len(offs) - 1
            if batch_size is None:
                batch_size = b
            elif b != batch_size:
                raise ValueError(f"feature {f.name!r} has batch size {b}, others {batch_size}")
            per_table.setdefault(f.table, []).append((f, keys, offs))
        tables: dict[str, _TableBatch] = {}
        dedup: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        # admission counts a training batch (not an eval or no-grad forward: grad mode is per thread)
        counting = self.training and torch.is_grad_enabled()
        counts: list[tuple[TableTiers, tuple[np.ndarray, np.ndarray]]] = []
        for t, items in per_table.items():  # compressed tables: the P partition keys of each key, key-major
            if self._comp[t] is not None:
                per_table[t] = partition_keys(self._comp[t], self.tiers[t], items, counting, counts)
        try:
            for t, items in per_table.items():
                # tables fed by the very same key arrays (DeepFM's emb and lin) share one de-duplication
                ident = tuple(id(k) for _, k, _ in items)
                if ident not in dedup:
                    with CLOCK("dedup"):
                        dedup[ident] = unique_inverse(np.concatenate([k for _, k, _ in items]))
                ukeys, inv = dedup[ident]
                arrays: dict[str, np.ndarray] = {}
                single = all(offs is None for _, _, offs in items)
                if single:  # one gather for the whole table: its features' inverses, sample-major
                    parts = self._comp[t].parts if self._comp[t] is not None else 1
                    arrays[_STACKED] = np.ascontiguousarray(
                        inv.reshape(len(items), -1, parts).transpose(1, 0, 2)).reshape(-1)
                else:
                    start = 0
                    for f, k, offs in items:
                        arrays[f.name] = inv[start:start + len(k)]
                        if offs is not None:
                            arrays[f"{f.name}#offsets"] = offs[:-1]
                        start += len(k)
                tiers = self.tiers[t]
                with tiers.lock:
                    if tiers.closed:
                        raise StoreClosedError(f"the store holding table {t!r} is closed")
                    admitted, side, seen = admit(tiers, ukeys, inv, counting)
                    if seen is not None:
                        counts.append((tiers, seen))
                    res = ukeys if admitted is None else ukeys[admitted]
                    if tiers.device is not None:
                        db = tiers.device.prepare(res, arrays)
                        tb = _TableBatch(t, ukeys, db.slots, device=db)
                        up = db.tensors
                    else:
                        tb = _TableBatch(t, ukeys, tiers.host.make_resident(res, pin=True))
                        up = {n: torch.from_numpy(a) for n, a in arrays.items()}
                    tb.admitted, tb.side = admitted, side
                    if admitted is not None:
                        tb.admitted_idx = torch.from_numpy(np.flatnonzero(admitted))
                        tb.side_idx = torch.from_numpy(np.flatnonzero(~admitted))
                tables[t] = tb
                if single:
                    tb.stacked = up[_STACKED]
                    continue
                for f, _, offs in items:
                    tb.inverse[f.name] = up[f.name]
                    if offs is not None:
                        tb.offsets[f.name] = up[f"{f.name}#offsets"]
        except BaseException:
            for tb in tables.values():
                self._unpin(tb)
            raise
        for tiers, (keys, occ) in counts:  # counted once every table of the batch is resident
            with tiers.lock:
                tiers.table.filter.add(keys, occ)  # type: ignore[union-attr]
        return PreparedBatch(int(batch_size or 0), tables)

    # -------------------------------------------------------------- stage 3
    def forward(self, batch: PreparedBatch | Mapping[str, FeatureInput]) -> dict[str, torch.Tensor]:
        """Embeddings per feature.

        In training mode with gradients enabled, the batch stays pinned until
        :meth:`apply_gradients` (or :meth:`release`); otherwise (eval, inference) it is released
        before this returns.

        Args:
            batch: a :class:`PreparedBatch`, or raw inputs (then prepared here).
        Returns:
            feature name -> float32 tensor (B, dim) (pooled for bag features).
        """
        stacked, out = self._gather(batch)
        for t, x in stacked.items():
            out.update(zip(self._by_table[t], x.unbind(1)))
        return {f.name: out[f.name] for f in self.features}

    def forward_tables(self, batch: PreparedBatch | Mapping[str, FeatureInput]) -> dict[str, TableOutput]:
        """Embeddings per table, for tables whose features are all single-valued: one gather
        per table instead of one per feature (what the models use). A table with
        ``linear_column`` comes split into its embedding and its first-order weight, each
        contiguous. Pins as :meth:`forward`.

        Returns:
            table -> :class:`TableOutput`: ``emb`` float32 (B, F_t, D) in feature order,
            ``linear`` float32 (B, F_t) or None.
        Raises:
            ValueError: a table has a bag feature (use :meth:`forward`).
        """
        stacked, out = self._gather(batch, split=True)
        if out:
            bags = sorted({f.table for f in self.features if f.name in out})
            raise ValueError(f"tables {bags} have bag features: use forward() for per-feature outputs")
        return stacked

    def _gather(self, batch: PreparedBatch | Mapping[str, FeatureInput],
                split: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
        """The batch's rows: ``(table -> (B, F_t, dim) for tables of single-valued features
        (with ``split``, a :class:`~damo_hybrid.nn.gather.TableOutput`), feature -> (B, dim) for the others)``."""
        if not isinstance(batch, PreparedBatch):
            batch = self.prepare(batch)
        train = self.training and torch.is_grad_enabled()
        refuse_unapplied(self, batch, train)
        try:
            stacked: dict[str, torch.Tensor] = {}
            out: dict[str, torch.Tensor] = {}
            for t, tb in batch.tables.items():
                tiers = self.tiers[t]
                if tb.device is not None:
                    assert tiers.device is not None
                    rows = tiers.device.gather(tb.device)
                else:
                    rows = torch.from_numpy(tiers.host.weights_of(tb.slots))
                if tb.admitted is not None:  # keys not admitted: their initial (or zero) rows, not cached
                    full = rows.new_empty((len(tb.ukeys), rows.shape[1]))
                    full[tb.admitted_idx.to(rows.device)] = rows  # type: ignore[union-attr]
                    full[tb.side_idx.to(rows.device)] = torch.from_numpy(tb.side).to(rows.device)  # type: ignore[union-attr]
                    rows = full
                leaf = rows.requires_grad_(train)
                tb.leaf = leaf if train else None
                comp, cfg = self._comp[t], tiers.table.cfg
                if tb.stacked is not None:
                    shape = (batch.batch_size, len(self._by_table[t]))
                    if comp is not None:
                        e, w = combine_parts(leaf, tb.stacked, comp.parts, comp.op, cfg.linear_column)
                        if split:
                            stacked[t] = TableOutput(e.view(*shape, -1), None if w is None else w.view(shape))
                        else:
                            stacked[t] = (e if w is None else torch.cat([e, w[:, None]], 1)).view(*shape, -1)
                    elif split and cfg.linear_column:
                        e, w = split_gather(leaf, tb.stacked, leaf.shape[1] - 1)
                        stacked[t] = TableOutput(e.view(*shape, -1), w.view(shape))
                    else:
                        x = leaf.index_select(0, tb.stacked).view(*shape, -1)
                        stacked[t] = TableOutput(x, None) if split else x
                    continue
                for name, idx in tb.inverse.items():
                    src = leaf
                    if comp is not None:  # each value's combined row first, then its bag's pooling
                        e, w = combine_parts(leaf, idx, comp.parts, comp.op, cfg.linear_column)
                        src = e if w is None else torch.cat([e, w[:, None]], 1)
                        idx = torch.arange(len(src), device=src.device)
                    if name in tb.offsets:
                        out[name] = torch.nn.functional.embedding_bag(idx, src, tb.offsets[name], mode=self._pooling[name])
                    else:
                        out[name] = src if comp is not None else src.index_select(0, idx)
        except BaseException:
            self.release(batch)
            raise
        if train:
            self._pending = batch
        else:
            self.release(batch)  # the outputs are copies: nothing needs the pins after this
        return stacked, out

    def apply_gradients(self, step: int | None = None) -> None:
        """Step every row of the last batch once with its table's optimizer, then unpin them.

        Two phases: every table's rows are first stepped on copies, and the gradients and the
        results checked; only then is anything stored. So a NaN/Inf (gradient or result) under
        the ``raise`` policy in any table changes no row and no step counter in any table, and
        under ``skip`` every table drops (and counts) its bad rows alike. Rows that received no
        gradient (the loss did not depend on them) are not stepped.

        Raises:
            NonFiniteGradientError: nothing was written; the batch is released.
        """
        batch = self._pending
        if batch is None or batch.applied:
            raise RuntimeError("no batch to apply: run forward() and backward() first")
        try:
            staged = [self._stage(t, tb, tb.leaf.grad, step) for t, tb in batch.tables.items()
                      if tb.leaf is not None and tb.leaf.grad is not None]
            for t, kept, commit in staged:
                with self.tiers[t].step_lock:
                    if self.tiers[t].closed:  # closed while this batch was staged: say so, store nothing
                        raise StoreClosedError(f"the store holding table {t!r} was closed during this step: "
                                               "its updates were not stored")
                    commit()
                table = self.tiers[t].table
                table.count_dropped(*kept)
                table.advance()
        finally:
            self.release(batch)

    def _stage(self, t: str, tb: _TableBatch, grad: torch.Tensor,
               step: int | None) -> tuple[str, list[np.ndarray | None], Callable[[], None]]:
        """Step one table's rows on copies and check gradients and results (raising changes nothing).

        Returns:
            ``(table, keep masks, store the step)``: the masks are the ``skip`` policy's bool
            rows kept (None: all), to count once stored.
        """
        tiers = self.tiers[t]
        table = tiers.table
        if tiers.closed:
            raise StoreClosedError(f"the store holding table {t!r} is closed: these updates would never be written")
        if self.store.read_only:
            raise DamoHybridError("the store was opened read_only: it serves lookups, not training")
        lr = table.lr(step)
        keys = tb.ukeys
        if tb.admitted is not None:  # the gradients of keys not admitted are dropped (counted on commit)
            keys = keys[tb.admitted]
            grad = grad[tb.admitted_idx.to(grad.device)]  # type: ignore[union-attr]
        commit = stage_rows(tiers, tb.slots, tb.device, keys, grad, lr)
        if tb.admitted is None:
            return t, commit[0], commit[1]
        dropped = int(np.count_nonzero(~tb.admitted))

        def store_and_count() -> None:
            commit[1]()
            table.counters.dropped_unadmitted += dropped
        return t, commit[0], store_and_count

    def release(self, batch: PreparedBatch | None = None) -> None:
        """Unpin a batch's rows without applying anything."""
        batch = batch or self._pending
        if batch is None or batch.applied:
            return
        for tb in batch.tables.values():
            self._unpin(tb)
            tb.leaf = None
        batch.applied = True

    def _unpin(self, tb: _TableBatch) -> None:
        tiers = self.tiers[tb.table]
        if tb.device is not None:
            assert tiers.device is not None
            tiers.device.release(tb.device)
        else:
            tiers.host.unpin(tb.slots)

    def flush(self) -> None:
        """Send every updated row of every tier down to the storage and flush it (``store.flush()``)."""
        self.store.flush()

    def cache_stats(self) -> dict[str, CacheStats]:
        """Per-table :class:`~damo_hybrid.cache.host.CacheStats` of the host tiers."""
        return {t: c.stats for t, c in self.caches.items()}

    def device_cache_stats(self) -> dict[str, CacheStats]:
        """Per-table stats of the device tiers (empty without one)."""
        return {t: c.stats for t, c in self.device_caches.items()}
