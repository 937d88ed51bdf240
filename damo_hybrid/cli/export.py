"""``damo-hybrid export --onnx DIR``: a trained built-in model, from its latest training checkpoint, for serving.

A sharded run's checkpoint is exported whole: its ranks' rows are merged into one temporary
store (:func:`~damo_hybrid.dist.checkpoint.restore_shard` onto one rank) in a hidden folder beside
``DIR``, which is removed afterwards (or by the next export, after a kill); the output is the same
as one process's. ``DIR`` is replaced whole (:func:`~damo_hybrid.serving.onnx.export_onnx`): an
interrupted export leaves the previous one, and a folder that is not an export is refused before
any work.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import torch

from ..errors import DamoHybridError
from ..storage.files import check_replaceable, scratch_dir
from ..store import EmbeddingStore


def export_onnx_from_checkpoint(args: argparse.Namespace) -> int:
    from ..dist.checkpoint import is_sharded, newest_checkpoint, restore_shard
    from ..nn.models import MODELS
    from ..serving.onnx import EXPORT_MARKERS, export_onnx

    check_replaceable(Path(args.onnx), EXPORT_MARKERS, "ONNX export")  # before any work, not after
    store_dir = Path(args.store)
    root = Path(args.checkpoint_dir) if args.checkpoint_dir else store_dir.with_name(store_dir.name + ".ckpt")
    found = newest_checkpoint(root, log=print, move_damaged=False)  # export only reads: --resume sets it aside
    if found is None:
        raise DamoHybridError(f"no complete training checkpoint under {root}: train with --checkpoint-every N "
                              "(or give --checkpoint-dir)")
    ck, state = found
    spec = state.get("model_spec") or {}
    classes = {cls.__name__: cls for cls in MODELS.values()}
    cls = classes.get(state.get("model_class", ""))
    if cls is None or not spec.get("fields") or spec.get("n_dense") is None:
        raise DamoHybridError(f"checkpoint {ck} does not say which built-in model wrote it (written by an older "
                              "version, or by a custom model): export from Python with damo_hybrid.serving.export_onnx")
    with ExitStack() as stack:
        if is_sharded(ck):  # every rank's rows merged into one store beside the output, removed after
            tmp = stack.enter_context(scratch_dir(Path(args.onnx).resolve()))
            store = stack.enter_context(restore_shard(ck, tmp / "store", 0, 1))
        else:
            store = stack.enter_context(EmbeddingStore(ck / "store", read_only=True))
        model = cls(store, spec["fields"], spec["n_dense"], backend="cpu", dense_mode=spec.get("dense_mode", "raw"),
                    field_tables=spec.get("field_tables"))
        model.load_state_dict(state["model"])
        with torch.no_grad():
            out = export_onnx(model, args.onnx)
    print(f"wrote {out}: {cls.__name__} of {ck.name}, {len(spec['fields'])} fields, {spec['n_dense']} dense")
    return 0
