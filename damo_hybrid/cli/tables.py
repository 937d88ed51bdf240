"""The tables a ``train`` run opens: the model's layout, its options (compression, row dtype, admission),
and the layout of a store written earlier."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..checks import clip, reject_unknown
from ..config import AdmissionConfig, InitializerConfig, OptimizerConfig, TableConfig
from ..keys.compression import CompressionConfig
from ..nn.models import model_tables
from ..store import EmbeddingStore

__all__ = ["model_tables_of", "field_tables_of", "FIELD_OPTIONS"]


FIELD_OPTIONS = ("table-compression", "row-dtype")  # what a [fields.NAME] table of the TOML config may set


def _init(comp: CompressionConfig | None, seed: int) -> InitializerConfig:
    # a product of k partition rows starts at a plain row's spread (0.01) when each has 0.01**(1/k)
    k = comp.parts if comp is not None and comp.op == "mult" else 1
    return InitializerConfig.truncated_normal(std=0.01 ** (1 / k), seed=seed)


def field_tables_of(args: argparse.Namespace, opt: OptimizerConfig, fields: list[str]
                    ) -> tuple[list[TableConfig], dict[str, str]]:
    """The tables of the fields a ``[fields.NAME]`` table of the TOML config gives options of their
    own (``table-compression``, ``row-dtype``; the others as ``[train]``), and which field reads
    which: ``(tables, field -> table)``, each such field in a table ``emb.NAME``.

    Raises:
        ValueError: an unknown field or option, or a bad value: one line naming the config file
            and the key, as ``[train]`` errors do.
    """
    given = getattr(args, "fields", None) or {}
    where = f"{args.config}: " if getattr(args, "config", None) else ""  # [fields] come from --config
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"{where}[fields] names fields {clip(unknown, 80)} the data does not have; its fields: "
                         f"{clip(fields, 120)}")
    tables: list[TableConfig] = []
    out: dict[str, str] = {}
    for f, o in given.items():
        if not isinstance(o, dict):
            raise ValueError(f"{where}[fields] {f} = {clip(o)}: must be a table [fields.{f}] of options "
                             f"({', '.join(FIELD_OPTIONS)})")
        try:
            reject_unknown(f"[fields.{f}] options", o, FIELD_OPTIONS)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        try:
            comp = CompressionConfig.parse(o["table-compression"]) if "table-compression" in o else args.table_compression
            [t] = model_tables(args.model, args.dim, opt, _init(comp, args.seed), name=f"emb.{f}", compression=comp)
            t = dataclasses.replace(t, row_dtype=o.get("row-dtype", args.row_dtype))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}[fields.{f}]: {e}") from None
        if args.min_count > 1:
            t = dataclasses.replace(t, admission=AdmissionConfig(min_count=args.min_count))
        tables.append(t)
        out[f] = t.name
    return tables, out


def model_tables_of(args: argparse.Namespace, opt: OptimizerConfig) -> list[TableConfig]:
    """The tables of ``--model``: DeepFM and Wide&Deep keep each key's first-order weight in the
    last column of its embedding row (one row per key); a store written with a separate ``lin``
    table (an earlier layout) keeps it."""
    comp = args.table_compression
    init = _init(comp, args.seed)
    legacy = False
    if args.store and (Path(args.store) / "meta.json").exists():
        with EmbeddingStore(args.store, read_only=True) as existing:
            emb = existing.tables.get("emb")
            legacy = "lin" in existing.tables and not (emb is not None and emb.linear_column)
    if legacy and args.table_compression is not None:
        raise ValueError(f"--table-compression needs the one-row layout; {args.store} holds a separate lin table")
    if legacy:
        tables = [TableConfig("emb", args.dim, initializer=init, optimizer=opt),
                  TableConfig("lin", 1, initializer=InitializerConfig.zeros(), optimizer=opt)]
    else:
        tables = model_tables(args.model, args.dim, opt, init, compression=args.table_compression)
    if args.row_dtype != "float32":
        tables = [dataclasses.replace(t, row_dtype=args.row_dtype) for t in tables]
    if args.min_count > 1:
        tables = [dataclasses.replace(t, admission=AdmissionConfig(min_count=args.min_count)) for t in tables]
    return tables
