"""``damo-hybrid bench``: which benchmark the flags pick, and its printed report."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..precision import RowDtype
from ..storage.files import atomic_file
from .args import check_writable, float_in, int_in


def _save(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """The report at ``--json``, written beside it and renamed into place: a failed write (a full
    disk) leaves the previous report whole."""
    if args.json:
        with atomic_file(args.json) as f:
            f.write(json.dumps(res, indent=1).encode())


_MODES = ("quality", "compression", "gpu", "train", "dist", "host", "write_criteo", "loader")
_ALL = {"store", *_MODES}
# the options each benchmark reads ("store": the default one); another benchmark's option is refused
_USES: dict[str, set[str]] = {
    "rows": {"store"}, "dims": {"store"}, "batches": {"store"}, "repeats": {"store"}, "flat_steps": {"store"},
    "dir": {"store", "loader", "gpu"}, "json": _ALL - {"write_criteo"},
    "train_steps": {"train"}, "data": {"train"}, "data_format": {"train"}, "fractions": {"train"},
    "row_dtypes": {"train"}, "storages": {"train"}, "worker_threads": {"train"},
    "host_threads": {"host"}, "loader_rows": {"loader", "write_criteo"}, "loader_repeats": {"loader"},
    "ratios": {"compression"}, "methods": {"compression"}, "data_root": {"quality", "compression"},
    "datasets": {"quality", "compression"}, "seeds": {"quality", "compression"},
    "gpu_rows": {"gpu"}, "gpu_batches": {"gpu"}, "gpu_steps": {"gpu"}, "models": {"gpu"}, "sides": {"gpu"},
    "device_fraction": {"gpu"}, "host_fraction": {"gpu"}, "trace_dir": {"gpu"},
    "world": {"dist"}, "host_rate": {"dist"}, "compute_ms": {"dist"},
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _bench_name(mode: str) -> str:
    return "the store benchmark (bench alone)" if mode == "store" else f"bench {_flag(mode)}"


def _items(opt: str, text: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",")] if str(text).strip() else []
    if not items or "" in items:
        raise ValueError(f"{opt}: give at least one value, comma-separated, got {text!r}")
    return items


def _ints(opt: str, text: str, lo: int, hi: int | None = None) -> tuple[int, ...]:
    out = []
    for x in _items(opt, text):
        try:
            v = int(x)
        except ValueError:
            raise ValueError(f"{opt}: {x!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{opt}: each must be in [{lo}, {hi}], got {v}" if hi is not None
                             else f"{opt}: each must be >= {lo}, got {v}")
        out.append(v)
    return tuple(out)


def _floats(opt: str, text: str, lo: float, hi: float | None, lo_open: bool, hi_open: bool = True) -> tuple[float, ...]:
    out = []
    for x in _items(opt, text):
        try:
            v = float(x)
        except ValueError:
            raise ValueError(f"{opt}: {x!r} is not a number") from None
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo)
                and (hi is None or (v < hi if hi_open else v <= hi))):
            rng = f"{'(' if lo_open else '['}{lo:g}, {'inf' if hi is None else f'{hi:g}'}{')' if hi is None or hi_open else ']'}"
            raise ValueError(f"{opt}: each must lie in {rng}, got {x}")
        out.append(v)
    return tuple(out)


def _names(opt: str, text: str, known: Any, what: str = "") -> tuple[str, ...]:
    items = tuple(_items(opt, text))
    bad = sorted(set(items) - set(known))
    if bad:
        raise ValueError(f"{opt}: unknown {what}{bad}; known: {sorted(known)}")
    return items


def _folder(opt: str, path: str | None) -> None:
    if path is not None and not Path(path).is_dir():
        raise ValueError(f"{opt} {path}: no such folder")


def check_bench_args(args: argparse.Namespace) -> dict[str, Any]:
    """Check every ``bench`` argument before any work: one benchmark, only its options, each
    value in range. Returns the parsed lists the benchmark takes (option dest -> tuple).

    Raises:
        ValueError: one line naming the option.
    """
    from ..data.schema import FORMATS

    modes = [m for m in _MODES if getattr(args, m)]
    if len(modes) > 1:
        raise ValueError(f"give one benchmark at a time, got {' and '.join(_flag(m) for m in modes)}")
    mode = modes[0] if modes else "store"
    parser = argparse.ArgumentParser(add_help=False)
    add_bench_arguments(parser)
    defaults = vars(parser.parse_args([]))
    for dest, uses in _USES.items():
        if mode not in uses and getattr(args, dest) != defaults[dest]:
            raise ValueError(f"{_flag(dest)} applies to {' and '.join(_bench_name(m) for m in sorted(uses))}, "
                             f"not to {_bench_name(mode)}")
    v: dict[str, Any] = {}
    if mode in ("store", "loader", "gpu"):
        _folder("--dir", args.dir)
    if mode == "store":
        v["dims"], v["batches"] = _ints("--dims", args.dims, 1, 65535), _ints("--batches", args.batches, 1)
        if max(v["batches"]) > args.rows:
            raise ValueError(f"--batches {max(v['batches'])} exceeds --rows {args.rows}: a batch draws distinct "
                             "stored keys")
    elif mode == "train":
        from ..bench.train import STORAGES

        v["fractions"] = _floats("--fractions", args.fractions, 0.0, 1.0, lo_open=True, hi_open=False)
        v["row_dtypes"] = _names("--row-dtypes", args.row_dtypes, [d.value for d in RowDtype], "row dtypes ")
        v["storages"] = _names("--storages", args.storages, STORAGES)
        _names("--data-format", args.data_format, [k for k, s in FORMATS.items() if s])
        if args.data is not None and not Path(args.data).is_file():
            raise ValueError(f"--data {args.data}: no such file")
    elif mode == "host":
        v["host_threads"] = _ints("--host-threads", args.host_threads, 1)
    elif mode in ("quality", "compression"):
        from ..bench.quality import DATASETS

        known = [*DATASETS, "synthetic"] if mode == "compression" else list(DATASETS)
        v["datasets"] = _names("--datasets", args.datasets, known)
        v["seeds"] = _ints("--seeds", args.seeds, 0)
        if mode == "compression":
            from ..bench.compression import METHODS

            v["methods"] = _names("--methods", args.methods, METHODS)
            v["ratios"] = _floats("--ratios", args.ratios, 1.0, None, lo_open=False)
        if any(d != "synthetic" for d in v["datasets"]):
            _folder("--data-root", args.data_root)
    elif mode == "gpu":
        v["models"] = _names("--models", args.models, ("deepfm", "dlrm"))
        v["sides"] = _names("--sides", args.sides, ("hbm", "device", "cpu"))
        v["gpu_batches"] = _ints("--gpu-batches", args.gpu_batches, 1)
    elif mode == "write_criteo":
        check_writable("--write-criteo", args.write_criteo)
    _check_resources(mode, args, v)
    return v


_CRITEO_ROW_BYTES = 186  # a row of write_criteo_file's text


def _check_resources(mode: str, args: argparse.Namespace, v: dict[str, Any]) -> None:
    """Refuse a benchmark whose tables, caches or files cannot fit in the memory or on the disk
    there is (:mod:`damo_hybrid.resources`), naming the option to change."""
    import tempfile

    from ..errors import OutOfSpaceError
    from ..resources import check_fits, fmt_bytes, free_disk_bytes

    def disk(need: float, where: str | None, fix: str) -> None:
        free = free_disk_bytes(where or tempfile.gettempdir())
        if free is not None and need > free:
            raise OutOfSpaceError(f"bench needs about {fmt_bytes(need)} of disk in {where or 'the temporary folder'}, "
                                  f"more than the {fmt_bytes(free)} free: {fix}")

    if mode == "store":  # the keys in memory; each dim's table on disk, all kept until the end
        check_fits([(f"keys of --rows {args.rows:,}", 24 * args.rows)], "lower --rows", "bench")
        disk(args.rows * sum(4 * d + 64 for d in v["dims"]), args.dir, "lower --rows, or give --dir on a larger disk")
    elif mode in ("loader", "write_criteo"):
        text = _CRITEO_ROW_BYTES * args.loader_rows
        where = args.dir if mode == "loader" else str(Path(args.write_criteo).parent)
        disk(2 * text if mode == "loader" else text, where, "lower --loader-rows" + (", or give --dir on a larger disk"
                                                                                     if mode == "loader" else ""))
    elif mode == "gpu":
        from ..ops import cuda_available

        row = 4 * (2 * 17 + 2) + 40  # a DeepFM row of dim 16 + 1 with Adagrad state, in the host tier
        parts = [(f"host caches, --host-fraction {args.host_fraction:g}", args.host_fraction * args.gpu_rows * row)]
        if not cuda_available():  # the hbm and device sides run on the CPU
            parts += [("the in-memory table", args.gpu_rows * 17 * 4 * 2),
                      (f"device caches, --device-fraction {args.device_fraction:g}",
                       args.device_fraction * args.gpu_rows * row)]
        check_fits(parts, f"lower --gpu-rows {args.gpu_rows:,}", "bench --gpu")


def _check_failed(what: str) -> int:
    """Report a benchmark's failed check (one line on stderr); the exit status 1."""
    line = " ".join(f"damo-hybrid bench: check failed: {what}".split())
    print(line if len(line) < 300 else line[:298] + "…", file=sys.stderr)
    return 1


def run_bench(args: argparse.Namespace) -> int | None:
    """Run the benchmark ``--quality``, ``--compression``, ``--gpu``, ``--train``, ``--dist``, ``--host``,
    ``--write-criteo`` or ``--loader`` asks for, after checking every argument
    (:func:`check_bench_args`); None for the store benchmark (the default), which the caller runs.

    Returns:
        0, or 1 where a check the benchmark makes failed (a run that failed, a quality gap past
        its budget, a reader that lost rows), said in one line on stderr.
    """
    from ..bench import CheckFailed, RankFailed

    v = check_bench_args(args)
    try:
        return _run_mode(args, v)
    except CheckFailed as e:
        return _check_failed(str(e))
    except RankFailed as e:  # one line naming the rank; 3 where the system stopped it
        from .failure import SYSTEM, explain

        f = explain(e, "bench")
        print(f"damo-hybrid bench: error: {f.line}", file=sys.stderr)
        return SYSTEM if e.died else f.status


def _run_mode(args: argparse.Namespace, v: dict[str, Any]) -> int | None:
    if args.quality:
        from ..bench.quality import run_quality

        res = run_quality(args.data_root, v["datasets"], v["seeds"], log_fn=print)
        print("\n| dataset | train/eval rows | epochs | damo AUC | in-memory AUC | gap | damo logloss | in-memory logloss |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in res["datasets"].items():
            m = r["mean"]
            print(f"| {n} | {r['train_rows']:,}/{r['eval_rows']:,} | {r['epochs']} | {m['damo']['auc']:.4f} | "
                  f"{m['in_memory']['auc']:.4f} | {r['auc_gap']:+.5f} | {m['damo']['logloss']:.4f} | "
                  f"{m['in_memory']['logloss']:.4f} |")
        _save(args, res)
        off = [f"{n} AUC gap {r['auc_gap']:+.4f}" for n, r in res["datasets"].items() if not r["within_0.005"]]
        return _check_failed(f"{', '.join(off)}: beyond the 0.005 budget") if off else 0
    if args.compression:
        from ..bench.compression import run_compression_study

        res = run_compression_study(args.data_root, v["datasets"], v["seeds"], v["ratios"], v["methods"], log_fn=print)
        print("\n| dataset | method | row ratio | rows | MiB | AUC | logloss | samples/s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for n, d in res["datasets"].items():
            for r in d["runs"]:
                print(f"| {n} | {r['method']} | {r['ratio']:g}x | {r['rows']:,.0f} | {r['bytes'] / 2**20:,.2f} | "
                      f"{r['auc']:.4f} | {r['logloss']:.4f} | {r['samples_per_s']:,.0f} |")
        _save(args, res)
        from ..bench.compression import missed_goals

        missed = missed_goals(res)
        return _check_failed(f"{len(missed)} goal{'s' * (len(missed) > 1)} missed: {'; '.join(missed)}") if missed else 0
    if args.gpu:
        from ..bench.gpu import run_gpu_bench

        res = run_gpu_bench(models=v["models"], rows=args.gpu_rows, batch_sizes=v["gpu_batches"], steps=args.gpu_steps,
                            device_fraction=args.device_fraction, host_fraction=args.host_fraction,
                            sides=v["sides"], root=args.dir, trace_dir=args.trace_dir, log_fn=print)
    elif args.train:
        from ..bench.train import run_train_bench

        res = run_train_bench(steps=args.train_steps, fractions=v["fractions"], row_dtypes=v["row_dtypes"],
                              data_path=args.data, data_format=args.data_format, storages=v["storages"],
                              worker_threads=args.worker_threads, log=print)
        _save(args, res)
        failed = [r for r in res["damo"] if "error" in r]
        if failed:
            r = failed[0]
            return _check_failed(f"{len(failed)} of {len(res['damo'])} damo_hybrid runs failed; the first, cache "
                                 f"{r['fraction']:g} of the table, {r['row_dtype']} rows: {r['error']}")
        return 0
    elif args.dist:
        res = _dist(args)
    elif args.host:
        from ..bench.host import run_host_bench

        res = run_host_bench(threads=v["host_threads"], log=print)
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
    b.add_argument("--fractions", default="0.25,0.05", help="cache budgets as fractions of the torch table's bytes, "
                   "each in (0, 1] (for --train)")
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
    b.add_argument("--gpu-rows", type=int_in(1), default=10**8, help="rows of the in-HBM table (for --gpu)")
    b.add_argument("--gpu-batches", default="8192,65536")
    b.add_argument("--gpu-steps", type=int_in(1), default=40)
    b.add_argument("--models", default="deepfm,dlrm")
    b.add_argument("--sides", default="hbm,device,cpu")
    b.add_argument("--device-fraction", type=float_in(0.0, 1.0, hi_open=False), default=0.10,
                   help="device-cache rows as a fraction of --gpu-rows")
    b.add_argument("--host-fraction", type=float_in(0.0, 1.0, hi_open=False), default=0.25,
                   help="host-cache rows as a fraction of --gpu-rows")
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
