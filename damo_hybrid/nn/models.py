"""CTR models whose sparse part is an :class:`~damo_hybrid.nn.EmbeddingCollection`.

Every model takes ``embedding_module``: a module that serves the same per-field embeddings
from somewhere else (the in-memory ``nn.Embedding`` baseline of the benchmarks,
:class:`damo_hybrid.bench.baseline.InMemoryEmbeddings`, or a table-free
:class:`~damo_hybrid.nn.dhe.DeepHashEmbedding`), so a comparison trains the very same dense
modules on both sides.

``dense_mode="autodis"`` embeds the dense features with :class:`~damo_hybrid.nn.autodis.AutoDis`:
they join the categorical fields as ``n_dense`` more embeddings (in DeepFM's FM term, DCN's
crosses and DLRM's dot products) instead of entering the MLPs as raw values; Wide & Deep's wide
part keeps its linear term over the raw values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import InitializerConfig, OptimizerConfig, TableConfig
from ..keys.compression import CompressionConfig
from ..store import EmbeddingStore
from .autodis import AutoDis
from .collection import EmbeddingCollection, Feature

__all__ = ["DeepFM", "WideAndDeep", "DCNv2", "DLRM", "MODELS", "mlp", "model_tables"]


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


class _SparseCTR(nn.Module):
    """Shared sparse part: each field has an embedding (``emb_table``) and, for models with a
    first-order term, a first-order weight: the last column of ``emb_table`` where that table
    has ``linear_column`` (one row per key: the fast layout), else a dim-1 ``lin_table``. Both
    live in the store behind their cache tiers; or, with ``embedding_module``, both come from
    that module (``prepare(sparse) -> batch`` and ``forward(batch) -> (e (B, F, D),
    first-order (B,) or None)``, with a ``dim``)."""

    def __init__(self, store: EmbeddingStore | None, fields: Sequence[str], emb_table: str, lin_table: str | None,
                 cache_mb: float | None, min_cache_rows: int | None, backend: str, device_cache_mb: float | None,
                 embedding_module: nn.Module | None, n_dense: int = 0, dense_mode: str = "raw",
                 field_tables: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if dense_mode not in ("raw", "autodis"):
            raise ValueError(f"dense_mode must be 'raw' or 'autodis', got {dense_mode!r}")
        self.fields = list(fields)
        unknown = sorted(set(field_tables or {}) - set(self.fields))
        if unknown:
            raise ValueError(f"field_tables names fields {unknown} the model does not have; its fields: {self.fields}")
        # the fields reading a table of their own (``field_tables``), the others read emb_table
        self.field_tables = {f: t for f, t in (field_tables or {}).items() if t != emb_table}
        self.lin = lin_table is not None
        self.rows = embedding_module
        self.sparse: EmbeddingCollection | None = None
        if embedding_module is not None:
            self.dim = int(embedding_module.dim)
        else:
            self._collection(store, emb_table, lin_table, cache_mb, min_cache_rows, backend, device_cache_mb)
        self.dense_mode = dense_mode
        self.autodis = AutoDis(n_dense, self.dim) if dense_mode == "autodis" and n_dense else None
        # the embeddings the interaction layers see, and the raw dense values the MLPs take
        self.n_fields = len(self.fields) + (n_dense if self.autodis is not None else 0)
        self.n_dense_in = 0 if self.autodis is not None else n_dense

    def _collection(self, store: EmbeddingStore | None, emb_table: str, lin_table: str | None, cache_mb: float | None,
                    min_cache_rows: int | None, backend: str, device_cache_mb: float | None) -> None:
        if store is None:
            raise ValueError("give a store, or an embedding_module to serve the rows")
        cfg = store.tables.get(emb_table)
        self.emb_table = emb_table
        self.column = cfg is not None and cfg.linear_column  # the row's last column is the first-order weight
        self.lin_table = lin_table if self.lin and not self.column else None
        table_of = {f: self.field_tables.get(f, emb_table) for f in self.fields}
        # the tables in order of their first field, and each field's place in their concatenation
        self.tables = list(dict.fromkeys(table_of.values()))
        order = [f for t in self.tables for f in self.fields if table_of[f] == t]
        self.register_buffer("_field_perm", torch.tensor([order.index(f) for f in self.fields]), persistent=False)
        if self.field_tables and self.lin_table is not None:
            raise ValueError(f"field_tables need the one-row layout (linear_column); {emb_table!r} has a separate "
                             f"first-order table {lin_table!r}")
        for t in self.tables:  # every table a field reads has emb_table's layout
            c = store.tables.get(t)
            if t != emb_table and c is not None and c.linear_column != self.column:
                raise ValueError(f"table {t!r} must have linear_column={self.column}, as {emb_table!r}")
        feats = [Feature(f, table_of[f]) for f in self.fields]
        if self.lin_table is not None:
            feats += [Feature(f"{f}#lin", self.lin_table) for f in self.fields]
        cls: Any = EmbeddingCollection
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from ..dist.collection import (
                ShardedEmbeddingCollection,  # tables split over the ranks
            )

            cls = ShardedEmbeddingCollection
        self.sparse = cls(store, feats, cache_mb=cache_mb, min_cache_rows=min_cache_rows, backend=backend,
                          device_cache_mb=device_cache_mb)
        widths = {f: self.sparse.dims[f] for f in self.fields}
        if len(set(widths.values())) > 1:
            raise ValueError(f"every field's embedding must be as wide; the fields' widths are {widths}")
        self.dim = self.sparse.dims[self.fields[0]] - (1 if self.column else 0)

    def inputs(self, sparse: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw sparse keys -> the collection's inputs (a field may feed two tables)."""
        out = {f: sparse[f] for f in self.fields}
        if self.lin_table is not None:
            out.update({f"{f}#lin": sparse[f] for f in self.fields})
        return out

    def prepare(self, sparse: Mapping[str, np.ndarray]) -> Any:
        """Make a batch's rows resident (stage 2); returns what :meth:`forward` takes."""
        if self.rows is not None:
            return self.rows.prepare(sparse)
        assert self.sparse is not None
        return self.sparse.prepare(self.inputs(sparse))

    def embeddings(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(e (B, F, D), first-order sum (B,) or None)``: one gather per table."""
        if self.rows is not None:
            return self.rows(batch)
        assert self.sparse is not None
        x = self.sparse.forward_tables(batch)
        if len(self.tables) > 1:  # fields with tables of their own: back into field order
            e = torch.cat([x[t].emb for t in self.tables], 1).index_select(1, self._field_perm)
            return e, sum(x[t].linear.sum(1) for t in self.tables) if self.lin else None  # type: ignore[union-attr, return-value]
        rows = x[self.emb_table]
        first = None
        if self.lin:
            first = rows.linear.sum(1) if self.column else x[self.lin_table].emb[..., 0].sum(1)  # type: ignore[index, union-attr]
        return rows.emb, first

    def embeddings_and_dense(self, batch: Any, dense: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(e (B, n_fields, D), first-order sum (B,) or None, dense values for the MLPs (B,
        n_dense_in))``: with AutoDis the dense features' embeddings follow the categorical ones."""
        e, first = self.embeddings(batch)
        if self.autodis is None:
            return e, first, dense
        return torch.cat([e, self.autodis(dense)], 1), first, dense[:, :0]

    def forward(self, batch: Any, dense: torch.Tensor) -> torch.Tensor:
        """Logits, float32 (B,): the embeddings (:meth:`embeddings_and_dense`), then :meth:`dense_part`."""
        e, first, dense_in = self.embeddings_and_dense(batch, dense)
        return self.dense_part(e, first, dense, dense_in)

    def dense_part(self, e: torch.Tensor, first: torch.Tensor | None, dense: torch.Tensor,
                   dense_in: torch.Tensor) -> torch.Tensor:
        """The dense part: logits float32 (B,) from what :meth:`embeddings_and_dense` gives and the
        raw dense values (B, n_dense). Row ``i`` of the output depends on row ``i`` of the inputs
        only, so a batch's dense part may run in parts (the trainer's split of the worker's compute,
        :mod:`damo_hybrid.pipeline.split`)."""
        raise NotImplementedError

    def apply_sparse_gradients(self) -> None:
        """Step the batch's rows (a no-op with an embedding module: its own optimizer steps it)."""
        if self.sparse is not None:
            self.sparse.apply_gradients()

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters other than the embedding module's rows."""
        skip = {id(p) for p in self.rows.parameters()} if self.rows is not None else set()
        return [p for p in self.parameters() if id(p) not in skip]


class WideAndDeep(_SparseCTR):
    """Wide & Deep (Cheng et al. 2016): a wide linear part over ids and dense values plus an MLP.

    Args:
        store: an open store holding ``emb_table``: dim D + 1 with ``linear_column`` (the
            first-order weight is its last column; recommended), or dim D beside a dim-1
            ``lin_table``.
        fields: categorical field names (the keys of the sparse input).
        n_dense: number of dense features.
        hidden: MLP hidden sizes.
        cache_mb, min_cache_rows: cache budget for the sparse tables (default: the store's).
        backend, device_cache_mb: where rows are served and computed (see
            :class:`~damo_hybrid.nn.EmbeddingCollection`); the model's dense layers belong on
            ``model.sparse.device``.
        embedding_module: serve the rows from this module instead of the store (see above).
        dense_mode: ``raw`` (dense values into the MLP) or ``autodis`` (see above); every
            model takes it.
        field_tables: field -> the table it reads instead of ``emb_table`` (a field with its own
            compression or row dtype, :func:`model_tables`); every model takes it. Every
            field's embedding must be as wide, and the tables agree on ``linear_column``.
    """

    def __init__(self, store: EmbeddingStore | None, fields: Sequence[str], n_dense: int, hidden: Sequence[int] = (400, 400),
                 emb_table: str = "emb", lin_table: str = "lin", cache_mb: float | None = None,
                 min_cache_rows: int | None = None, backend: str = "auto", device_cache_mb: float | None = None,
                 embedding_module: nn.Module | None = None, dense_mode: str = "raw",
                 field_tables: Mapping[str, str] | None = None) -> None:
        super().__init__(store, fields, emb_table, lin_table, cache_mb, min_cache_rows, backend, device_cache_mb,
                         embedding_module, n_dense, dense_mode, field_tables)
        self.n_dense = n_dense
        # no dense features (Avazu, MovieLens, Frappe): no dense linear term
        self.dense_linear = nn.Linear(n_dense, 1) if n_dense else None
        self.deep = mlp([self.n_fields * self.dim + self.n_dense_in, *hidden, 1])

    def dense_part(self, e: torch.Tensor, first: torch.Tensor | None, dense: torch.Tensor,
                   dense_in: torch.Tensor) -> torch.Tensor:
        assert first is not None
        if self.dense_linear is not None:
            first = first + self.dense_linear(dense).squeeze(1)
        return first + self.deep(torch.cat([e.flatten(1), dense_in], 1)).squeeze(1)


class DeepFM(WideAndDeep):
    """DeepFM (Guo et al. 2017): Wide & Deep's parts plus the FM pairwise term
    ``0.5 * sum_d ((sum_f e_fd)^2 - sum_f e_fd^2)``, all sharing one embedding per field."""

    def dense_part(self, e: torch.Tensor, first: torch.Tensor | None, dense: torch.Tensor,
                   dense_in: torch.Tensor) -> torch.Tensor:
        s = e.sum(1)
        fm = 0.5 * (s * s - (e * e).sum(1)).sum(1)
        return super().dense_part(e, first, dense, dense_in) + fm


class DCNv2(_SparseCTR):
    """DCN-V2 (Wang et al. 2021), parallel form: full-rank cross layers
    ``x_{l+1} = x0 * (W x_l + b) + x_l`` beside an MLP, then a linear head."""

    def __init__(self, store: EmbeddingStore | None, fields: Sequence[str], n_dense: int, hidden: Sequence[int] = (400, 400),
                 cross_layers: int = 3, emb_table: str = "emb", cache_mb: float | None = None,
                 min_cache_rows: int | None = None, backend: str = "auto", device_cache_mb: float | None = None,
                 embedding_module: nn.Module | None = None, dense_mode: str = "raw",
                 field_tables: Mapping[str, str] | None = None) -> None:
        super().__init__(store, fields, emb_table, None, cache_mb, min_cache_rows, backend, device_cache_mb,
                         embedding_module, n_dense, dense_mode, field_tables)
        self.n_dense = n_dense
        d = self.n_fields * self.dim + self.n_dense_in
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(cross_layers))
        self.deep = mlp([d, *hidden])
        self.head = nn.Linear(d + (hidden[-1] if hidden else d), 1)

    def dense_part(self, e: torch.Tensor, first: torch.Tensor | None, dense: torch.Tensor,
                   dense_in: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([e.flatten(1), dense_in], 1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        deep = torch.relu(self.deep(x0)) if len(self.deep) else x0
        return self.head(torch.cat([x, deep], 1)).squeeze(1)


class DLRM(_SparseCTR):
    """DLRM (Naumov et al. 2019): a bottom MLP maps dense features to the embedding width,
    pairwise dot products of all vectors feed a top MLP."""

    def __init__(self, store: EmbeddingStore | None, fields: Sequence[str], n_dense: int, bottom: Sequence[int] = (64,),
                 top: Sequence[int] = (400, 400), emb_table: str = "emb", cache_mb: float | None = None,
                 min_cache_rows: int | None = None, backend: str = "auto", device_cache_mb: float | None = None,
                 embedding_module: nn.Module | None = None, dense_mode: str = "raw",
                 field_tables: Mapping[str, str] | None = None) -> None:
        super().__init__(store, fields, emb_table, None, cache_mb, min_cache_rows, backend, device_cache_mb,
                         embedding_module, n_dense, dense_mode, field_tables)
        self.n_dense = n_dense
        # without raw dense features (none, or AutoDis embeds them) there is no bottom vector:
        # only the embeddings interact
        nd = self.n_dense_in
        self.bottom = mlp([nd, *bottom, self.dim]) if nd else None
        n = self.n_fields + (1 if nd else 0)
        self.register_buffer("_iu", torch.triu_indices(n, n, offset=1), persistent=False)
        self.top = mlp([(self.dim if nd else 0) + n * (n - 1) // 2, *top, 1])

    def dense_part(self, e: torch.Tensor, first: torch.Tensor | None, dense: torch.Tensor,
                   dense_in: torch.Tensor) -> torch.Tensor:
        dense = dense_in
        if self.bottom is None:
            z = torch.bmm(e, e.transpose(1, 2))[:, self._iu[0], self._iu[1]]
            return self.top(z).squeeze(1)
        b = torch.relu(self.bottom(dense))
        v = torch.cat([b.unsqueeze(1), e], 1)  # (B, F + 1, D)
        z = torch.bmm(v, v.transpose(1, 2))[:, self._iu[0], self._iu[1]]
        return self.top(torch.cat([b, z], 1)).squeeze(1)


MODELS = {"deepfm": DeepFM, "wide_deep": WideAndDeep, "dcn": DCNv2, "dlrm": DLRM}


def model_tables(model: str, dim: int, optimizer: OptimizerConfig, initializer: InitializerConfig,
                 name: str = "emb", compression: CompressionConfig | None = None) -> list[TableConfig]:
    """The table a model of :data:`MODELS` reads, in the recommended layout: one row per key,
    ``dim`` wide, plus (DeepFM, Wide&Deep) a last column for the first-order weight
    (``linear_column``).

    Args:
        model: a key of :data:`MODELS`.
        dim: embedding width D (of the combined rows, with ``compression``: a ``concat`` of
            ``P`` partitions stores rows of ``D / P``).
        compression: optional; see :class:`~damo_hybrid.keys.compression.CompressionConfig`.
    Raises:
        ValueError: ``dim`` is not a multiple of the partitions a ``concat`` joins.
    """
    first_order = issubclass(MODELS[model], WideAndDeep)  # DeepFM is one
    width = dim
    if compression is not None and compression.op == "concat":
        if dim % compression.parts:
            raise ValueError(f"dim {dim} must be a multiple of the {compression.parts} partitions that "
                             f"{compression.kind.value} concatenates")
        width = dim // compression.parts
    return [TableConfig(name, width + first_order, initializer=initializer, optimizer=optimizer,
                        linear_column=first_order, compression=compression)]
