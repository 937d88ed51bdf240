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

Backends (chosen once, at construction): ``cpu`` serves rows from the host caches and
computes on the CPU; ``cuda`` adds a :class:`~damo_hybrid.device_cache.DeviceCache` per table
in GPU memory in front of the host caches, and the outputs live on the GPU; ``auto`` picks
``cuda`` where CUDA and CuPy work, else ``cpu``.

Thread safety: one batch in flight per module unless :meth:`prepare` is driven by a pipeline
that serialises cache access (the host manager), as the trainer does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from .device_cache import DeviceBatch, DeviceCache
from .hashing import as_keys
from .host_cache import CacheStats, HostCache
from .ops import Backend, resolve_backend
from .store import EmbeddingStore

__all__ = ["Feature", "EmbeddingCollection", "PreparedBatch", "DEFAULT_DEVICE_CACHE_MB"]

DEFAULT_DEVICE_CACHE_MB = 2048.0  # device-cache budget of the cuda backend when none is given

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
    device: DeviceBatch | None = None  # device tier: its pinned slots and uploaded indices
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
        min_cache_rows: floor per table and tier (a batch's distinct keys plus the pinned rows
            of the batches in flight must fit).
        backend: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see the module doc).
        device_cache_mb: device-cache budget, split like ``cache_mb``. Default: none on the
            ``cpu`` backend, :data:`DEFAULT_DEVICE_CACHE_MB` on ``cuda``. Given with the ``cpu``
            backend, the device tier runs in host memory (its logic without a GPU).

    Raises:
        ValueError: bad features or budgets, or ``backend="cuda"`` where CUDA is unavailable.
    """

    def __init__(self, store: EmbeddingStore, features: Sequence[Feature], cache_mb: float = 256.0,
                 min_cache_rows: int = 1 << 16, backend: Backend | str = Backend.AUTO,
                 device_cache_mb: float | None = None) -> None:
        super().__init__()
        if not features:
            raise ValueError("features must not be empty")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names in {names}")
        if cache_mb <= 0:
            raise ValueError(f"cache_mb must be > 0, got {cache_mb}")
        if device_cache_mb is not None and device_cache_mb <= 0:
            raise ValueError(f"device_cache_mb must be > 0, got {device_cache_mb}")
        self.backend = resolve_backend(backend)
        if self.backend is Backend.CUDA:
            self.device = torch.device("cuda", torch.cuda.current_device())
            device_cache_mb = DEFAULT_DEVICE_CACHE_MB if device_cache_mb is None else device_cache_mb
        else:
            self.device = torch.device("cpu")
        self.store = store
        self.features = list(features)
        tables = sorted({f.table for f in features})
        ops = {t: store.table_ops(t)[1] for t in tables}

        def split(mb: float, per_row: dict[str, int]) -> dict[str, int]:
            share = mb * 2**20 / sum(per_row.values())  # equal row counts; bytes follow the row size
            return {t: max(min_cache_rows, int(share)) for t in tables}

        host_rows = split(cache_mb, {t: HostCache.nbytes_per_row(o.dim, o.width) for t, o in ops.items()})
        self.caches = {t: HostCache(store, t, host_rows[t]) for t in tables}
        self.device_caches: dict[str, DeviceCache] = {}
        if device_cache_mb is not None:
            dev_rows = split(device_cache_mb, {t: DeviceCache.nbytes_per_row(o.dim, o.width) for t, o in ops.items()})
            self.device_caches = {t: DeviceCache(self.caches[t], dev_rows[t], self.device) for t in tables}
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
                arrays: dict[str, np.ndarray] = {}
                start = 0
                for f, k, offs in items:
                    arrays[f.name] = inv[start:start + len(k)]
                    if offs is not None:
                        arrays[f"{f.name}#offsets"] = offs[:-1]
                    start += len(k)
                dc = self.device_caches.get(t)
                if dc is not None:
                    db = dc.prepare(ukeys, arrays)
                    tb = _TableBatch(t, ukeys, db.slots, device=db)
                    up = db.tensors
                else:
                    tb = _TableBatch(t, ukeys, self.caches[t].make_resident(ukeys, pin=True))
                    up = {n: torch.from_numpy(a) for n, a in arrays.items()}
                tables[t] = tb
                for f, _, offs in items:
                    tb.inverse[f.name] = up[f.name]
                    if offs is not None:
                        tb.offsets[f.name] = up[f"{f.name}#offsets"]
        except BaseException:
            for tb in tables.values():
                self._unpin(tb)
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
            if tb.device is not None:
                rows = self.device_caches[t].gather(tb.device)
            else:
                rows = torch.from_numpy(self.caches[t].weights[tb.slots])
            leaf = rows.requires_grad_(self.training)
            tb.leaf = leaf
            for name, idx in tb.inverse.items():
                if name in tb.offsets:
                    out[name] = torch.nn.functional.embedding_bag(idx, leaf, tb.offsets[name], mode=self._pooling[name])
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
                if tb.leaf is None or tb.leaf.grad is None:
                    continue
                if tb.device is not None:
                    self._apply_device(t, tb, tb.leaf.grad, step)
                else:
                    self._apply_host(t, tb, tb.leaf.grad, step)
        finally:
            self.release(batch)

    def _apply_host(self, t: str, tb: _TableBatch, grad: torch.Tensor, step: int | None) -> None:
        g = np.ascontiguousarray(grad.numpy(), dtype=np.float32)
        keys, g2, lr = self.store.begin_step(t, tb.ukeys, g, step)
        if len(keys) != len(tb.ukeys):  # skip policy dropped non-finite rows
            self.caches[t].step_slots(tb.slots[np.isin(tb.ukeys, keys)], g2, lr)
        else:
            self.caches[t].step_slots(tb.slots, g2, lr)
        self.store.end_step(t)

    def _apply_device(self, t: str, tb: _TableBatch, grad: torch.Tensor, step: int | None) -> None:
        assert tb.device is not None
        g = grad.to(torch.float32)
        keep = None
        if not bool(torch.isfinite(g).all()):  # the step's one host sync: nothing is written on a raise
            # rare path: the store applies its NaN/Inf policy (raise, or drop and count) on a host copy
            keys, _, lr = self.store.begin_step(t, tb.ukeys, g.cpu().numpy(), step)
            keep = torch.from_numpy(np.isin(tb.ukeys, keys)).to(g.device)
        else:
            lr = self.store.step_lr(t, step)
        self.device_caches[t].step(tb.device, g, lr, keep)
        self.store.end_step(t)

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
        if tb.device is not None:
            self.device_caches[tb.table].release(tb.device)
        else:
            self.caches[tb.table].unpin(tb.slots)

    def flush(self) -> None:
        """Send every updated row down the tiers to the store and flush it."""
        for dc in self.device_caches.values():
            dc.flush()
        for c in self.caches.values():
            c.flush()

    def cache_stats(self) -> dict[str, CacheStats]:
        """Per-table :class:`~damo_hybrid.host_cache.CacheStats` of the host caches."""
        return {t: c.stats for t, c in self.caches.items()}

    def device_cache_stats(self) -> dict[str, CacheStats]:
        """Per-table stats of the device caches (empty without a device tier)."""
        return {t: c.stats for t, c in self.device_caches.items()}
