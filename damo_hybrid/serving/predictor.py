"""Serve an export of :func:`~damo_hybrid.serving.onnx.export_onnx` with onnxruntime.

:class:`Predictor` maps raw uint64 keys to rows with one ``searchsorted`` per table over the
export's sorted key arrays (memory-mapped, so a map of 10^8 keys costs page cache, not a
Python dict), then runs the graph. A compressed table's keys are first turned into their
partition keys, as in training; with fields on several tables (format 3) each table maps its own
fields' keys. A key the table never stored maps to row 0 (zeros), as the
seed's inference export maps an unknown id.

Before serving, the export's ``MANIFEST.json`` is checked: every file the predictor loads must be
the one that export wrote (size and SHA-256), so a key map and a graph of two exports are never
served together. An export written before manifests is served with a logged warning.

Needs the ``serve`` extra (onnxruntime).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import clip
from ..errors import DamoHybridError
from ..keys.compression import CompressionConfig
from ..keys.hashing import as_keys
from ..storage.files import DamagedOutputError, read_whole, verify_manifest
from .onnx import EXPORT_FORMAT, EXPORT_FORMAT_COMPRESSED, EXPORT_FORMAT_FIELD_TABLES

_FIX = "re-export it (damo-hybrid export --onnx, or damo_hybrid.serving.export_onnx)"

__all__ = ["Predictor"]


def _check_meta(meta: Any, path: Path) -> None:
    """Refuse an ``export.json`` whose values are not of the types :func:`export_onnx` writes:
    nothing is converted (a ``"13"`` is not 13 dense features).

    Raises:
        DamagedOutputError: one line naming the file, the key and its value.
    """
    def names(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def bad(key: str, want: str) -> DamagedOutputError:
        return DamagedOutputError(f"{path}: {key} is {clip(meta.get(key))}, not {want}: the ONNX export is damaged; "
                                  f"{_FIX}")

    if not isinstance(meta, dict):
        raise DamagedOutputError(f"{path} is not a JSON object: the ONNX export is damaged; {_FIX}")
    tables = meta.get("tables")
    if not isinstance(tables, dict) or not all(isinstance(t, str) for t in tables):
        raise bad("tables", "an object of table names")
    if not names(meta.get("fields")):
        raise bad("fields", "a list of field names")
    n = meta.get("n_dense")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise bad("n_dense", "an int >= 0")
    if not isinstance(meta.get("emb_table"), str) or meta["emb_table"] not in tables:
        raise bad("emb_table", "one of its tables")
    if meta.get("lin_table") is not None and (not isinstance(meta["lin_table"], str) or meta["lin_table"] not in tables):
        raise bad("lin_table", "one of its tables or null")
    ft = meta.get("field_tables")
    if ft is not None and (not isinstance(ft, dict) or set(ft) != set(meta["fields"])
                           or not all(isinstance(t, str) and t in tables for t in ft.values())):
        raise bad("field_tables", "an object of each field's table")
    if meta.get("compression") is not None and not isinstance(meta["compression"], dict):
        raise bad("compression", "an object or null")
    comps = meta.get("compressions")
    if comps is not None and (not isinstance(comps, dict) or not all(c is None or isinstance(c, dict) for c in comps.values())):
        raise bad("compressions", "an object of objects or nulls")


def _rows(keys: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """int64 row of each key in the sorted ``stored`` keys (+1), 0 where it is absent."""
    pos = np.searchsorted(stored, keys)
    hit = pos < len(stored)
    hit[hit] = stored[pos[hit]] == keys[hit]
    return np.where(hit, pos + 1, 0).astype(np.int64)


class Predictor:
    """Logits of a trained model from raw keys, without the store.

    Args:
        export_dir: a directory written by :func:`~damo_hybrid.serving.onnx.export_onnx`.
        threads: onnxruntime intra-op threads (0: its default).
    Raises:
        DamoHybridError: not an export, or of another format version;
            :class:`~damo_hybrid.storage.files.DamagedOutputError`: its files are not those of one
            complete export (one missing, cut short, or of another export).
        ImportError: onnxruntime is missing (``pip install damo-hybrid[serve]``).
    """

    def __init__(self, export_dir: str | os.PathLike[str], threads: int = 0) -> None:
        import onnxruntime  # noqa: F401 - fail first where it is missing

        self._threads = threads
        read_whole(export_dir, self._load, "ONNX export")

    def _load(self, d: Path) -> None:
        """Verify and load the export in folder ``d``."""
        import onnxruntime as ort

        meta_path = d / "export.json"
        if not meta_path.is_file():
            raise DamoHybridError(f"{d} is not a damo_hybrid export (no export.json)")
        manifest = verify_manifest(d, "ONNX export", required=("export.json", "model.onnx"), fix=_FIX)
        try:
            self.meta = json.loads(meta_path.read_text())
            tables = list(self.meta["tables"])
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedOutputError(f"{meta_path} is unreadable ({str(e)[:80]}); {_FIX}") from None
        _check_meta(self.meta, meta_path)
        unlisted = [f"keys_{t}.npy" for t in tables if manifest is not None and f"keys_{t}.npy" not in manifest["files"]]
        if unlisted:
            raise DamagedOutputError(f"{d / unlisted[0]} is not one of the files its MANIFEST.json lists: the ONNX "
                                     f"export is incomplete or mixed; {_FIX}")
        known = (EXPORT_FORMAT, EXPORT_FORMAT_COMPRESSED, EXPORT_FORMAT_FIELD_TABLES)
        if self.meta.get("format") not in known:
            raise DamoHybridError(f"{d} holds export format {self.meta.get('format')}, this version reads {known}")
        self.fields: list[str] = self.meta["fields"]
        # each table's fields (positions in the field order) and mapping; formats 1-2: one table
        table_of = self.meta.get("field_tables") or {f: self.meta["emb_table"] for f in self.fields}
        comps = self.meta.get("compressions") or {self.meta["emb_table"]: self.meta.get("compression")}
        try:
            self._groups = [(t, [i for i, f in enumerate(self.fields) if table_of[f] == t],
                             CompressionConfig(**comps[t]) if comps.get(t) else None) for t in dict.fromkeys(table_of.values())]
        except (TypeError, ValueError, KeyError) as e:
            raise DamagedOutputError(f"{meta_path} holds a compression that cannot be read ({str(e)[:80]}); {_FIX}") from None
        self.n_dense: int = self.meta["n_dense"]
        self._keys = {t: np.load(d / f"keys_{t}.npy", mmap_mode="r") for t in self.meta["tables"]}
        opts = ort.SessionOptions()
        if self._threads:
            opts.intra_op_num_threads = self._threads
        self._session = ort.InferenceSession(str(d / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def predict(self, sparse: Mapping[str, np.ndarray] | np.ndarray, dense: np.ndarray | None = None) -> np.ndarray:
        """Logits float32 (B,).

        Args:
            sparse: field -> uint64 keys (B,), or uint64 (B, F) in the export's field order.
            dense: float32 (B, n_dense) (omit for a model without dense features).
        """
        if isinstance(sparse, np.ndarray):
            if sparse.ndim != 2 or sparse.shape[1] != len(self.fields):
                raise ValueError(f"sparse keys must be (B, {len(self.fields)}), got {sparse.shape}")
            cols = [as_keys(np.ascontiguousarray(sparse[:, i]), f) for i, f in enumerate(self.fields)]
        else:
            missing = [f for f in self.fields if f not in sparse]
            if missing:
                raise KeyError(f"sparse input lacks fields {missing}")
            cols = [as_keys(sparse[f], f) for f in self.fields]
        keys = np.stack(cols, 1)
        feeds = {}
        for t, idx, comp in self._groups:
            stored, k = self._keys[t], keys[:, idx]
            parts = k
            if comp is not None:
                flat = k.ravel()
                # double_hash: a key was frequent in training exactly where it has a row of its own
                frequent = _rows(comp.own_keys(flat), stored) > 0 if comp.kind.value == "double_hash" else None
                parts = comp.subkeys(flat, frequent).reshape(len(k), -1)
            name = "index" if len(self._groups) == 1 else f"index_{t}"
            feeds[name] = _rows(parts.ravel(), stored).reshape(parts.shape)
        if self.meta.get("lin_table"):
            feeds["lin_index"] = _rows(keys.ravel(), self._keys[self.meta["lin_table"]]).reshape(keys.shape)
        if self.n_dense:
            if dense is None or dense.shape != (len(keys), self.n_dense):
                raise ValueError(f"dense must be float32 ({len(keys)}, {self.n_dense}), got "
                                 f"{None if dense is None else dense.shape}")
            feeds["dense"] = np.ascontiguousarray(dense, dtype=np.float32)
        return self._session.run(["logit"], feeds)[0]
