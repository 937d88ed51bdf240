"""The commands that read a store: ``inspect``, ``export`` and ``dump`` (a sharded run's rank
stores are read as one, :func:`~damo_hybrid.dist.shards.open_for_reading`)."""

from __future__ import annotations

import argparse
import json

from ..config import RowDtype, TableConfig
from .args import check_writable


def inspect(args: argparse.Namespace) -> int:
    from ..dist.shards import (
        open_for_reading,  # a sharded run's rank stores read as one
    )

    with open_for_reading(args.store) as s:
        st = s.stats()
        out = {
            "store": str(args.store),
            "disk_bytes": st.disk_bytes,
            "tables": {
                n: {"rows": st.table_rows[n], "step": s.step(n), "config": c.to_dict()}
                for n, c in s.tables.items()
            },
        }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"store {out['store']}  disk {st.disk_bytes / 2**20:.1f} MiB  tables {len(out['tables'])}")
    for n, t in out["tables"].items():
        c = t["config"]
        tc = TableConfig.from_dict(c)
        print(f"  {n:24s} dim {c['dim']:4d}  rows {t['rows']:>12,}  step {t['step']:>9,}  "
              f"optimizer {c['optimizer']['kind']} lr {c['optimizer']['lr']}  init {c['initializer']['kind']}"
              + (f"  row_dtype {tc.row_dtype.value}" if tc.row_dtype is not RowDtype.FLOAT32 else "")
              + (f"  compression {tc.compression.describe()}" if tc.compression is not None else ""))
    return 0


def export(args: argparse.Namespace) -> int:
    if args.onnx:
        from .export import export_onnx_from_checkpoint

        return export_onnx_from_checkpoint(args)
    if not args.out:
        raise ValueError("export needs --out FILE.npz (the rows), or --onnx DIR (a model for serving)")
    check_writable("--out", args.out)
    from ..dist.shards import open_for_reading

    with open_for_reading(args.store) as s:
        n = s.export(args.out, tables=args.table or None)
    print(f"wrote {args.out}: " + ", ".join(f"{t} {c:,} rows" for t, c in n.items()))
    return 0


def dump(args: argparse.Namespace) -> int:
    from ..dist.shards import open_for_reading

    check_writable("--out", args.out)
    if args.format == "seed":
        from ..compat.seed_format import dump_seed_format

        with open_for_reading(args.store) as s:
            n = dump_seed_format(s, args.out, tables=args.table or None, min_count=args.min_count,
                                 expire_days=args.expire_days)
    else:
        with open_for_reading(args.store) as s:
            n = s.dump(args.out, tables=args.table or None, min_count=args.min_count, expire_days=args.expire_days)
    print(f"wrote {args.out}: " + ", ".join(f"{t} {c:,} rows" for t, c in n.items()))
    return 0
