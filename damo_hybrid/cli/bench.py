"""``damo-hybrid bench``: which benchmark the flags pick, and its printed report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..precision import RowDtype
from .args import float_in, int_in


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
        from ..bench.train import STORAGES, run_train_bench

        dtypes = tuple(args.row_dtypes.split(","))
        bad = sorted(set(dtypes) - {d.value for d in RowDtype})
        if bad:
            raise ValueError(f"unknown row dtypes {bad}; known: {[d.value for d in RowDtype]}")
        storages = tuple(args.storages.split(","))
        bad = sorted(set(storages) - set(STORAGES))
        if bad:
            raise ValueError(f"unknown --storages {bad}; known: {list(STORAGES)}")
        res = run_train_bench(steps=args.train_steps, fractions=tuple(float(x) for x in args.fractions.split(",")),
                              row_dtypes=dtypes, data_path=args.data, data_format=args.data_format, storages=storages,
                              worker_threads=args.worker_threads, log=print)
    elif args.dist:
        res = _dist(args)
    elif args.host:
        from ..bench.host import run_host_bench

        res = run_host_bench(threads=tuple(int(x) for x in args.host_threads.split(",")), log=print)
    elif args.write_criteo:
        from ..bench.loader import write_criteo_file

        n = write_criteo_file(Path(args.write_criteo), args.loader_rows)
        print(f"wrote {args.write_criteo}: {args.loader_rows:,} Criteo-format rows, {n / 2**20:,.0f} MiB of text")
        return 0
    elif args.loader:
        from ..bench.loader import run_loader_bench

        res = run_loader_bench(rows=args.loader_rows, repeats=args.loader_repeats, root=args.dir, log=print)
    else:
        return None
    _save(args, res)
    return 0


def _dist(args: argparse.Namespace) -> dict[str, Any]:
    """``bench --dist``: the measured communication, then the scaling model at 1..16 ranks."""
    from ..bench.dist import run_dist_bench, scaling_model, unique_per_rank

    batch = 4096
    res = run_dist_bench(world=args.world, batch=batch)
    print(f"{args.world} ranks on {res['machine']}, DeepFM dim 16, global batch {batch}, {res['steps']} steps "
          f"after {res['warmup']}:")
    print("| rank | unique keys sent+kept | keys KiB sent | rows+grads KiB sent | keys all-to-all ms | "
          "rows+grads all-to-all ms | step ms | samples/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["ranks"]:
        print(f"| {r['rank']} | {r['unique_keys_per_step']:,.0f} | {r['keys_bytes_per_step'] / 1024:,.0f} | "
              f"{r['rows_and_grads_bytes_per_step'] / 1024:,.0f} | {r['keys_ms_per_step']:.1f} | "
              f"{r['rows_and_grads_ms_per_step']:.1f} | {r['step_ms_median']:.0f} | {r['samples_per_s']:,.0f} |")
    model = []
    for ranks in (1, 2, 4, 8, 16):
        u = unique_per_rank(batch, ranks)
        for gbps in (10.0, 100.0):
            model.append(scaling_model(u, 4 * 17, batch, gbps, args.host_rate, args.compute_ms, ranks,
                                       res["ranks"][0]["dense_bytes"]))
    res["scaling_model"] = {"host_keys_per_s": args.host_rate, "compute_ms": args.compute_ms, "rows": model}
    print(f"\nscaling model (not a measurement; host {args.host_rate:,.0f} keys/s per rank, compute "
          f"{args.compute_ms:g} ms per whole batch):")
    print("| ranks | Gb/s | unique keys per rank | network ms | host ms | compute ms | samples/s | bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in model:
        print(f"| {m['ranks']} | {m['gbps']:g} | {m['unique_per_rank']:,.0f} | {m['net_ms']:.1f} | {m['host_ms']:.1f} | "
              f"{m['compute_ms']:.1f} | {m['samples_per_s']:,.0f} | {m['bound']} |")
    return res


def add_bench_arguments(b: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    b.add_argument("--rows", type=int_in(1), default=10_000_000)
    b.add_argument("--dims", default="16,64")
    b.add_argument("--batches", default="4096,65536")
    b.add_argument("--repeats", type=int_in(1), default=20)
    b.add_argument("--flat-steps", type=int_in(1), default=100)
    b.add_argument("--dir", help="where to build the stores (default: a temporary directory)")
    b.add_argument("--json", help="write the results as JSON here")
    b.add_argument("--train", action="store_true",
                   help="instead: the training benchmark, damo_hybrid vs in-memory torch embeddings (DeepFM)")
    b.add_argument("--train-steps", type=int_in(1), default=100, help="timed steps, in steady state (for --train)")
    b.add_argument("--host", action="store_true",
                   help="instead: the host-manager microbenchmark, unique keys/s per core at 1, 2, 4 and 8 threads")
    b.add_argument("--host-threads", default="1,2,4,8")
    b.add_argument("--loader", action="store_true",
                   help="the streaming reader on a Criteo TSV it writes (plain and gzip): rows/s and RSS")
    b.add_argument("--loader-rows", type=int_in(1), default=10_000_000)
    b.add_argument("--write-criteo", metavar="FILE",
                   help="instead: write a Criteo-format file of --loader-rows rows there (gzip if it ends in .gz)")
    b.add_argument("--data", help="with --train: train both sides on this file's batches, streamed (default: "
                   "synthetic batches); reports how long the worker waits for the loader")
    b.add_argument("--data-format", default="criteo", help="the --data file's format (with --train)")
    b.add_argument("--loader-repeats", type=int_in(1), default=3)
    b.add_argument("--fractions", default="0.25,0.05", help="cache budgets as fractions of the torch table's bytes")
    b.add_argument("--row-dtypes", default="float32", help="with --train: the row dtypes to run at each budget, "
                   "e.g. float32,float16 (16-bit rows fit more rows in the same bytes)")
    b.add_argument("--storages", default="rocksdb", help="with --train: where damo_hybrid's rows live, each run "
                   "in turn: rocksdb, memory (a dict: the ceiling without the storage's cost, nothing persisted)")
    b.add_argument("--worker-threads", type=int_in(1), default=None,
                   help="with --train: the worker's torch threads (default: every core but one; with more, set "
                   "OMP_WAIT_POLICY=PASSIVE)")
    b.add_argument("--quality", action="store_true",
                   help="instead: AUC/logloss parity with in-memory torch on the real datasets under --data-root")
    b.add_argument("--compression", action="store_true",
                   help="instead: quality against bytes of compressed tables (qr, binary code, hashing) per dataset")
    b.add_argument("--ratios", default="10,100,1000", help="row-compression ratios (for --compression)")
    b.add_argument("--methods", default="hashing,qr_mult,qr_concat,binary_code,double_hash,dhe")
    b.add_argument("--data-root", default="../shared/data", help="folder holding the datasets (for --quality)")
    b.add_argument("--datasets", default="criteo,avazu,movielens,frappe",
                   help="comma-separated; --compression also knows synthetic")
    b.add_argument("--seeds", default="0,1,2")
    b.add_argument("--gpu", action="store_true",
                   help="instead: the GPU tier benchmark: all rows in HBM vs the device cache vs CPU-only (DeepFM, DLRM)")
    b.add_argument("--gpu-rows", type=int, default=10**8, help="rows of the in-HBM table (for --gpu)")
    b.add_argument("--gpu-batches", default="8192,65536")
    b.add_argument("--gpu-steps", type=int, default=40)
    b.add_argument("--models", default="deepfm,dlrm")
    b.add_argument("--sides", default="hbm,device,cpu")
    b.add_argument("--device-fraction", type=float, default=0.10, help="device-cache rows as a fraction of --gpu-rows")
    b.add_argument("--host-fraction", type=float, default=0.25, help="host-cache rows as a fraction of --gpu-rows")
    b.add_argument("--trace-dir", help="write a profiler trace (Chrome format) of each device run here")
    b.add_argument("--dist", action="store_true",
                   help="instead: tables sharded over --world local ranks (gloo): bytes and all-to-all time per "
                        "step and rank, and the scaling model")
    b.add_argument("--world", type=int_in(2), default=2, help="ranks for --dist")
    b.add_argument("--host-rate", type=float_in(0.0), default=340_000.0,
                   help="host-side unique keys/s per rank for the --dist scaling model (default: training's host "
                        "CPU on this machine, ~150 ms per 50.7k keys; bench --host alone gives 827k on 1 thread)")
    b.add_argument("--compute-ms", type=float_in(0.0), default=200.0,
                   help="forward + backward ms of a whole batch on one rank, for the --dist scaling model")
