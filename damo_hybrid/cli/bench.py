"""``damo-hybrid bench``: which benchmark the flags pick, and its printed report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..precision import RowDtype


def _save(args: argparse.Namespace, res: dict[str, Any]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


def run_bench(args: argparse.Namespace) -> int | None:
    """Run the benchmark ``--quality``, ``--compression``, ``--gpu``, ``--train``, ``--host`` or ``--loader`` asks for; None
    for the store benchmark (the default), which the caller runs."""
    if args.quality:
        from ..bench.quality import DATASETS, run_quality

        names = tuple(args.datasets.split(","))
        unknown = [n for n in names if n not in DATASETS]
        if unknown:
            raise ValueError(f"unknown datasets {unknown}; known: {sorted(DATASETS)}")
        res = run_quality(args.data_root, names, tuple(int(x) for x in args.seeds.split(",")), log_fn=print)
        print("\n| dataset | train/eval rows | epochs | damo AUC | in-memory AUC | gap | damo logloss | in-memory logloss |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in res["datasets"].items():
            m = r["mean"]
            print(f"| {n} | {r['train_rows']:,}/{r['eval_rows']:,} | {r['epochs']} | {m['damo']['auc']:.4f} | "
                  f"{m['in_memory']['auc']:.4f} | {r['auc_gap']:+.5f} | {m['damo']['logloss']:.4f} | "
                  f"{m['in_memory']['logloss']:.4f} |")
        _save(args, res)
        return 0 if all(r["within_0.005"] for r in res["datasets"].values()) else 1
    if args.compression:
        from ..bench.compression import METHODS, run_compression_study
        from ..bench.quality import DATASETS

        names, methods = tuple(args.datasets.split(",")), tuple(args.methods.split(","))
        bad = [n for n in names if n not in (*DATASETS, "synthetic")] + [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown datasets or methods {bad}; known: {sorted(DATASETS)} and synthetic, {list(METHODS)}")
        res = run_compression_study(args.data_root, names, tuple(int(x) for x in args.seeds.split(",")),
                                    tuple(float(x) for x in args.ratios.split(",")), methods, log_fn=print)
        print("\n| dataset | method | row ratio | rows | MiB | AUC | logloss | samples/s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for n, d in res["datasets"].items():
            for r in d["runs"]:
                print(f"| {n} | {r['method']} | {r['ratio']:g}x | {r['rows']:,.0f} | {r['bytes'] / 2**20:,.2f} | "
                      f"{r['auc']:.4f} | {r['logloss']:.4f} | {r['samples_per_s']:,.0f} |")
        _save(args, res)
        return 0
    if args.gpu:
        from ..bench.gpu import run_gpu_bench

        res = run_gpu_bench(models=tuple(args.models.split(",")), rows=args.gpu_rows,
                            batch_sizes=tuple(int(x) for x in args.gpu_batches.split(",")), steps=args.gpu_steps,
                            device_fraction=args.device_fraction, host_fraction=args.host_fraction,
                            sides=tuple(args.sides.split(",")), root=args.dir, trace_dir=args.trace_dir,
                            log_fn=print)
    elif args.train:
        from ..bench.train import run_train_bench

        dtypes = tuple(args.row_dtypes.split(","))
        bad = sorted(set(dtypes) - {d.value for d in RowDtype})
        if bad:
            raise ValueError(f"unknown row dtypes {bad}; known: {[d.value for d in RowDtype]}")
        res = run_train_bench(steps=args.train_steps, fractions=tuple(float(x) for x in args.fractions.split(",")),
                              row_dtypes=dtypes, log=print)
    elif args.host:
        from ..bench.host import run_host_bench

        res = run_host_bench(threads=tuple(int(x) for x in args.host_threads.split(",")), log=print)
    elif args.loader:
        from ..bench.loader import run_loader_bench

        res = run_loader_bench(rows=args.loader_rows, repeats=args.loader_repeats, root=args.dir, log=print)
    else:
        return None
    _save(args, res)
    return 0
