"""Inference export of a trained built-in model: an ONNX graph over row indices plus a key map.

Serving cannot reach the store's RocksDB, and an ONNX graph cannot hash-map uint64 keys, so the
export splits the lookup in two, as the seed's inference export does:

- ``model.onnx``: the model with each table as a plain embedding matrix. Inputs ``index``
  int64 (B, F), the row of each field's key, and (with dense features) ``dense`` float32
  (B, n_dense); output ``logit`` float32 (B,). Row 0 of every matrix is zeros: the row of a
  key the table never stored.
- ``keys_<table>.npy``: the table's stored keys, sorted (uint64, 8 bytes per key: a compact
  binary map; key ``keys[i]`` is row ``i + 1``). :class:`~damo_hybrid.serving.predictor.Predictor`
  maps raw keys with one ``searchsorted`` per table.
- ``MANIFEST.json``, written last: an id and each file's size and SHA-256. The folder is built
  beside ``out_dir`` and swapped in whole (:func:`~damo_hybrid.storage.files.atomic_dir`), so an
  interrupted re-export leaves the previous export in place, and the
  :class:`~damo_hybrid.serving.predictor.Predictor` refuses files that are not one export's.
- ``export.json``: fields, tables, widths, the number of dense features, the format version,
  and a compressed table's mapping: its ``index`` is then (B, F * P), the rows of each field's
  ``P`` partition keys (:mod:`damo_hybrid.keys.compression`), combined in the graph as in training.
- A model whose fields read several tables (``field_tables``: a field with its own compression
  or row dtype) exports format 3: one input ``index_<table>`` per table, (B, F_t * P_t) over the
  fields of that table in the model's field order, and ``field_tables`` and per-table
  ``compressions`` in ``export.json``.

The graph is traced from the trained model itself: its embedding lookups are swapped for
:class:`IndexedRows` for the duration of the export, so every model of
:data:`~damo_hybrid.nn.models.MODELS` exports without knowing its constructor arguments.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn.gather import combine
from ..storage.files import atomic_dir

__all__ = ["export_onnx", "IndexedRows", "GroupedRows", "onnx_export", "EXPORT_FORMAT", "EXPORT_FORMAT_COMPRESSED",
           "EXPORT_FORMAT_FIELD_TABLES", "EXPORT_MARKERS"]

EXPORT_FORMAT = 1
EXPORT_FORMAT_COMPRESSED = 2  # ``compression`` in export.json: a reader of format 1 only refuses it
EXPORT_FORMAT_FIELD_TABLES = 3  # several tables, one index input each
EXPORT_MARKERS = ("export.json",)  # an existing folder holding it is an export, which a new one may replace


class IndexedRows(nn.Module):
    """A model's embedding lookups over row indices (what the exported graph holds).

    Args:
        emb: float32 (R + 1, width) rows of the model's table, row 0 zeros.
        dim: embedding width D; ``width`` is D + 1 where the last column is the first-order
            weight (a ``linear_column`` table).
        lin: float32 (R' + 1, 1) rows of a separate first-order table (the older two-table
            layout), indexed by ``lin_index`` (B, F) given after ``index``.
        compression: the table's, if compressed: ``index`` is then (B, F * P), each field's
            ``P`` partition rows, combined as in training.
        linear_column: whether the last column is the first-order weight (default: inferred
            from the widths of an uncompressed table).
    """

    def __init__(self, emb: np.ndarray, dim: int, lin: np.ndarray | None = None, compression: Any = None,
                 linear_column: bool | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.emb = nn.Embedding.from_pretrained(torch.from_numpy(emb), freeze=True)
        self.lin = nn.Embedding.from_pretrained(torch.from_numpy(lin), freeze=True) if lin is not None else None
        self.column = emb.shape[1] == dim + 1 if linear_column is None else linear_column
        self.parts = compression.parts if compression is not None else 1
        self.op = compression.op if compression is not None else None

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(e (B, F, D), first-order sum (B,) or None)`` of row indices."""
        index, lin_index = batch if isinstance(batch, tuple) else (batch, None)
        rows = self.emb(index)
        first = None
        if self.op is not None:  # a compressed table: each field's P partition rows, combined
            e, w = combine(rows.reshape(rows.shape[0], -1, self.parts, rows.shape[-1]), self.op, self.column)
            first = w.sum(1) if w is not None else None
        elif self.column:
            e, first = rows[..., :self.dim], rows[..., self.dim].sum(1)
        else:
            e = rows
        if self.lin is not None:  # a separate first-order table
            first = self.lin(lin_index)[..., 0].sum(1)
        return e, first


class GroupedRows(nn.Module):
    """The lookups of a model whose fields read several tables: one :class:`IndexedRows` per
    table, their embeddings put back into field order.

    Args:
        groups: one per table, in the order of the index tensors the forward takes.
        perm: int64 (F,) each field's position in the groups' concatenated fields.
    """

    def __init__(self, groups: list[IndexedRows], perm: torch.Tensor) -> None:
        super().__init__()
        self.groups = nn.ModuleList(groups)
        self.register_buffer("perm", perm.clone(), persistent=False)

    def forward(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        outs = [g(index) for g, index in zip(self.groups, batch)]
        e = torch.cat([o[0] for o in outs], 1).index_select(1, self.perm)
        firsts = [o[1] for o in outs if o[1] is not None]
        return e, (sum(firsts) if firsts else None)  # type: ignore[return-value]


def onnx_export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, **kwargs: Any) -> None:
    """``torch.onnx.export`` with the TorchScript exporter (no extra dependency; its deprecation
    warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # DLRM's pair indices are non-negative: the exporter's caution about negative ones does not apply
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)


def _stored(store: Any, table: str) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted keys uint64 (R,), rows float32 (R + 1, dim))`` with a zero row 0."""
    keys, weights = [], []
    for k, rows in store.scan(table):
        keys.append(k)
        weights.append(rows.weights)
    dim = store.tables[table].dim
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    w = np.concatenate([np.zeros((1, dim), np.float32), *weights])
    return k, w


@contextmanager
def _serving(model: nn.Module, rows: IndexedRows) -> Iterator[None]:
    old = model.rows
    model.rows = rows
    try:
        yield
    finally:
        model.rows = old


def export_onnx(model: nn.Module, out_dir: str | os.PathLike[str], opset: int = 17) -> Path:
    """Export a trained model of :data:`~damo_hybrid.nn.models.MODELS` for serving.

    Args:
        model: the trained model (its store open; cached updates are flushed first).
        out_dir: the folder to write: absent, empty, or an earlier export, which is replaced whole
            (built in a hidden sibling, swapped in when complete).
    Returns:
        ``out_dir``.
    Raises:
        ValueError: the model serves its rows from another module (nothing to export), or its
            separate first-order table is compressed, or ``out_dir`` holds something else than
            an export (nothing is written).
    """
    sparse = getattr(model, "sparse", None)
    if sparse is None:
        raise ValueError("export_onnx exports a model whose rows live in the store (built with a store)")
    write = _export_field_tables if len(getattr(model, "tables", ())) > 1 else _export_one
    if write is _export_one and model.lin_table is not None and \
            sparse.tiers[model.lin_table].table.cfg.compression is not None:
        raise ValueError(f"export_onnx exports a compressed first-order table only as the embedding row's last "
                         f"column (linear_column); {model.lin_table!r} is a separate compressed table")
    out = Path(out_dir)
    with atomic_dir(out, markers=EXPORT_MARKERS, what="ONNX export") as build:
        write(model, build, opset)
    return out


def _export_one(model: nn.Module, out: Path, opset: int) -> None:
    """Formats 1 and 2: one embedding table (and a separate first-order one), into ``out``."""
    sparse = model.sparse
    cfg = sparse.tiers[model.emb_table].table.cfg
    comp = cfg.compression
    store = sparse.store
    sparse.flush()
    keys, emb = _stored(store, model.emb_table)
    np.save(out / f"keys_{model.emb_table}.npy", keys)
    lin = None
    tables = {model.emb_table: int(emb.shape[1])}
    if model.lin_table is not None:
        lkeys, lin = _stored(store, model.lin_table)
        np.save(out / f"keys_{model.lin_table}.npy", lkeys)
        tables[model.lin_table] = 1
    rows = IndexedRows(emb, model.dim, lin, compression=comp, linear_column=cfg.linear_column)
    f = len(model.fields)
    inputs = (torch.zeros(2, f * rows.parts, dtype=torch.int64),
              *((torch.zeros(2, f, dtype=torch.int64),) if lin is not None else ()))
    names = ["index", *(["lin_index"] if lin is not None else []), *(["dense"] if model.n_dense else [])]
    _trace(model, rows, inputs, names, out / "model.onnx", opset)
    meta = {"format": EXPORT_FORMAT if comp is None else EXPORT_FORMAT_COMPRESSED, "model": type(model).__name__, "fields": list(model.fields),
            "n_dense": int(model.n_dense), "dim": int(model.dim), "emb_table": model.emb_table,
            "lin_table": model.lin_table, "tables": tables,
            "compression": comp.to_dict() if comp is not None else None}
    (out / "export.json").write_text(json.dumps(meta, indent=1))


class _Flat(nn.Module):
    """The model with positional tensor inputs (what the ONNX graph's inputs are): ``n_index``
    index tensors (one: the batch is that tensor; more: a tuple of them), then dense."""

    def __init__(self, model: nn.Module, n_index: int) -> None:
        super().__init__()
        self.model, self.n = model, n_index

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        batch, rest = (xs[0] if self.n == 1 else tuple(xs[:self.n])), xs[self.n:]
        # a model without dense features still takes a (B, 0) dense tensor
        dense = rest[0] if rest else torch.zeros(xs[0].shape[0], 0)
        return self.model(batch, dense)


def _trace(model: nn.Module, rows: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], path: Path,
           opset: int) -> None:
    """Trace ``model`` serving its rows from ``rows`` into ``path`` (inputs: the index tensors, then dense)."""
    n_index = len(names) - (1 if model.n_dense else 0)
    dense = (torch.zeros(2, model.n_dense),) if model.n_dense else ()
    axes = {n: {0: "batch"} for n in [*names, "logit"]}
    was = model.training
    model.eval()
    try:
        with _serving(model, rows), torch.no_grad():
            onnx_export(_Flat(model, n_index), (*inputs, *dense), path, input_names=names, output_names=["logit"],
                        dynamic_axes=axes, opset_version=opset)
    finally:
        model.train(was)


def _export_field_tables(model: nn.Module, out: Path, opset: int) -> None:
    """Format 3: one :class:`IndexedRows` per table, one ``index_<table>`` input each, into ``out``."""
    sparse = model.sparse
    sparse.flush()
    table_of = {f: model.field_tables.get(f, model.emb_table) for f in model.fields}
    groups, inputs, widths, comps = [], [], {}, {}
    for t in model.tables:
        cfg = sparse.tiers[t].table.cfg
        keys, emb = _stored(sparse.store, t)
        np.save(out / f"keys_{t}.npy", keys)
        g = IndexedRows(emb, model.dim, compression=cfg.compression, linear_column=cfg.linear_column)
        groups.append(g)
        inputs.append(torch.zeros(2, sum(table_of[f] == t for f in model.fields) * g.parts, dtype=torch.int64))
        widths[t], comps[t] = int(emb.shape[1]), (cfg.compression.to_dict() if cfg.compression is not None else None)
    names = [f"index_{t}" for t in model.tables] + (["dense"] if model.n_dense else [])
    _trace(model, GroupedRows(groups, model._field_perm), tuple(inputs), names, out / "model.onnx", opset)
    meta = {"format": EXPORT_FORMAT_FIELD_TABLES, "model": type(model).__name__, "fields": list(model.fields),
            "n_dense": int(model.n_dense), "dim": int(model.dim), "emb_table": model.emb_table, "lin_table": None,
            "tables": widths, "field_tables": table_of, "compressions": comps}
    (out / "export.json").write_text(json.dumps(meta, indent=1))
