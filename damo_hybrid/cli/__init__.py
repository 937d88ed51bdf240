"""The ``damo-hybrid`` command: its parser, its subcommands (``train`` in :mod:`.train`, ``demo``,
``inspect``/``export``/``dump`` in :mod:`.stores`, ``bench``) and ``main``, the one error boundary;
the only package that prints."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..config import OptimizerKind, RowDtype, reject_unknown
from ..data.schema import FORMATS
from . import stores
from .args import Parser, check_writable, compression_arg, float_in, int_in, load_config, store_config
from .bench import add_bench_arguments
from .demo import demo
from .signals import Terminated, sigterm_as_interrupt
from .train import train

__all__ = ["main"]


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command's parser and its ``train`` sub-parser (whose defaults a config file sets)."""
    p = Parser(prog="damo-hybrid", description=__doc__)
    p.add_argument("--version", action="version", version=f"damo-hybrid {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a CTR model; with no arguments, DeepFM on built-in synthetic Criteo-like data")
    t.add_argument("--config", help="TOML file: a [train] table of these options (the command line wins), a [store] table "
                                    "(StoreConfig), [fields.NAME] tables (a field's own table-compression and row-dtype) and, "
                                    "for --format csv/parquet, a [schema] table")
    t.add_argument("--data", help="training file (.gz is read on the fly); default: built-in synthetic data")
    t.add_argument("--stream", action="store_true", help="read --data (a file, glob or directory) and --eval-data "
                   "in blocks, in flat memory, instead of loading them whole")
    t.add_argument("--shuffle-buffer", type=int_in(0), default=0, metavar="N",
                   help="with --stream: shuffle rows within windows of N rows, reproducibly from --seed")
    t.add_argument("--rank-input", choices=("own", "all"), default="own",
                   help="with --stream on several ranks: own = each rank reads only its part of the input (its files "
                        "when there are at least as many as ranks, else its share of the bytes of plain-text files); "
                        "all = every rank reads all of it and keeps its slice of each global batch (the same steps "
                        "as one process, at the cost of every rank parsing everything)")
    t.add_argument("--eval-data", help="held-out file in the same format")
    t.add_argument("--eval-fraction", type=float_in(0.0, 1.0, lo_open=False), default=0.0,
                   help="without --eval-data: hold out this random fraction of --data (seeded by --seed)")
    t.add_argument("--format", choices=sorted(FORMATS), default="criteo",
                   help="format of --data and --eval-data: criteo TSV, avazu CSV, movielens u.data, libfm lines, "
                        "or csv/parquet with a [schema] in --config")
    t.add_argument("--epochs", type=int_in(1), default=1, help="passes over --data when --steps is not given")
    t.add_argument("--model", choices=("deepfm", "wide_deep", "dcn", "dlrm"), default="deepfm")
    t.add_argument("--steps", type=int_in(1), default=None, help="default: 150 on synthetic data (about a minute), else --epochs passes")
    t.add_argument("--batch-size", type=int_in(1), default=4096)
    t.add_argument("--dim", type=int_in(1, 65535), default=16)
    t.add_argument("--dense-mode", choices=["raw", "autodis"], default="raw",
                   help="dense features: raw values into the MLP, or AutoDis embeddings beside the categorical ones")
    t.add_argument("--table-compression", type=compression_arg, default=None, metavar="KIND:NAME=V,...",
                   help="store fewer rows than ids: qr:rows=R,m=M[,op=mult|add|concat][,partitions=K], "
                        "binary_code:rows=R,bits_per_block=B[,op=sum|mean|concat], hashing:rows=R or "
                        "double_hash:rows=R,min_count=N "
                        "(see docs/compression.md)")
    t.add_argument("--row-dtype", choices=[d.value for d in RowDtype], default="float32",
                   help="how the tables hold their weights: float32, or 16 bits with stochastic rounding "
                        "(half the bytes per weight in every tier; see docs/compression.md)")
    t.add_argument("--optimizer", default="adagrad", choices=[k.value for k in OptimizerKind])
    t.add_argument("--lr", type=float_in(0.0), default=0.05, help="sparse learning rate")
    t.add_argument("--dense-lr", type=float_in(0.0), default=1e-3, help="Adam learning rate of the dense layers")
    t.add_argument("--cache-mb", type=float_in(0.0), default=512.0,
                   help="host-cache budget (MiB); each table gets at least 65,536 rows whatever the budget")
    t.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where rows are served and the model computes: auto = cuda where CUDA and CuPy work, else cpu")
    t.add_argument("--device-cache-mb", type=float_in(0.0), default=None,
                   help="GPU device-cache budget (MiB) in front of the host cache; cuda backend only "
                        "(default 2048)")
    t.add_argument("--vocab-min", type=int_in(1), default=10**6)
    t.add_argument("--vocab-max", type=int_in(1), default=10**7)
    t.add_argument("--eval-batches", type=int_in(0), default=5, help="held-out batches (with --eval-data: 0 = all)")
    t.add_argument("--eval-every", type=int_in(0), default=0, help="also evaluate every N steps (on at most 20 held-out batches)")
    t.add_argument("--nproc", type=int_in(1), default=1,
                   help="train on N local ranks, the tables sharded over them: runs this command under torchrun "
                        "--standalone --nproc-per-node N (several machines: launch torchrun yourself)")
    t.add_argument("--threads", type=int_in(1), default=None,
                   help="torch threads (default: all cores, or all but one when prefetching)")
    t.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    t.add_argument("--store", help="store directory (default: a new temporary one, removed at exit)")
    t.add_argument("--json", help="write a machine-readable summary here")
    t.add_argument("--checkpoint-every", type=int_in(0), default=0, help="checkpoint the whole training state every N steps")
    t.add_argument("--checkpoint-dir", help="where checkpoints go (default: <store>.ckpt beside the store)")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    t.add_argument("--min-count", type=int_in(1, 255), default=1,
                   help="admission: a key's row is stored and trained only from its Nth occurrence on "
                        "(a counting Bloom filter; before that it reads as its initial row)")
    t.add_argument("--allow-run-change", action="store_true",
                   help="with --resume: continue although this run's options that change its result (--batch-size, "
                        "--seed, --data, --model, --store, ...) differ from the checkpoint's (each difference is printed)")
    t.add_argument("--allow-config-change", action="store_true",
                   help="let a changed --lr or --optimizer settings replace the config stored with the tables (logged)")
    t.add_argument("--no-prefetch", action="store_true",
                   help="run the sequential reference loop instead of the three-stage pipeline (same weights)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=train)

    d = sub.add_parser("demo", help="train a logistic regression on synthetic ids, all weights in RocksDB")
    d.add_argument("--steps", type=int_in(1), default=200)
    d.add_argument("--batch-size", type=int_in(1), default=4096)
    d.add_argument("--fields", type=int_in(1), default=8)
    d.add_argument("--vocab", type=int_in(1), default=1_000_000)
    d.add_argument("--lr", type=float_in(0.0), default=0.1)
    d.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    d.add_argument("--store", help="store directory (default: a new temporary one)")
    d.set_defaults(fn=demo)

    i = sub.add_parser("inspect", help="show a store's tables, row counts, disk size and config")
    i.add_argument("--store", required=True)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=stores.inspect)

    e = sub.add_parser("export", help="write keys_<table> and weights_<table> to .npz, or a trained model to ONNX")
    e.add_argument("--store", required=True)
    e.add_argument("--out", help="the .npz to write (rows)")
    e.add_argument("--table", action="append", help="a table to export (repeatable; default all)")
    e.add_argument("--onnx", metavar="DIR", help="export the model of the store's latest training checkpoint "
                   "to DIR: model.onnx over row indices, keys_<table>.npy, export.json (serve with "
                   "damo_hybrid.serving.Predictor)")
    e.add_argument("--checkpoint-dir", help="where train wrote its checkpoints (default: STORE.ckpt)")
    e.set_defaults(fn=stores.export)

    u = sub.add_parser("dump", help="export rows that pass the seed's conditions")
    u.add_argument("--store", required=True)
    u.add_argument("--out", required=True)
    u.add_argument("--table", action="append", help="a table to dump (repeatable; default all)")
    u.add_argument("--min-count", type=int_in(0), default=0, help="keep rows with at least this many updates")
    u.add_argument("--expire-days", type=float_in(0.0), default=None, help="keep rows updated within this many days")
    u.add_argument("--format", choices=("npz", "seed"), default="npz",
                   help="npz (keys/weights/counts/updated per table) or the seed project's binary format")
    u.set_defaults(fn=stores.dump)

    b = sub.add_parser("bench", help="store benchmark: lookup and apply_gradients keys/s straight from RocksDB")
    add_bench_arguments(b)
    b.set_defaults(fn=None)
    return p, t


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from ..data.schema import Schema
    from ..keys.compression import CompressionConfig
    from .args import clip, config_value

    parser, train = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "train" and args.config:
        # the file's [train] values become defaults, so explicit flags still win
        cfg = load_config(args.config)
        actions = {a.dest: a for a in train._actions if a.dest not in ("help", "config")}
        opts = {k.replace("-", "_"): v for k, v in cfg.get("train", {}).items()}
        written = {k.replace("-", "_"): k for k in cfg.get("train", {})}  # each key as the file spells it
        try:
            reject_unknown("[train] keys", opts, actions)
        except ValueError as e:
            raise ValueError(f"{args.config}: {e}") from None
        for k, v in list(opts.items()):  # the command line's checks, and the option's TOML type
            opts[k] = config_value(f"{args.config}: [train] {written[k]}", v, actions[k])
        # the other tables are checked here too, before anything runs or any store is touched
        try:
            store_config(cfg.get("store"))
            if cfg.get("schema") is not None:
                Schema.from_dict(cfg["schema"])
        except (TypeError, ValueError) as e:
            where = "" if str(e).startswith(("[store]", "unknown")) else "[schema] "
            raise ValueError(f"{args.config}: {where}{e}") from None
        for f, o in (cfg.get("fields") or {}).items():  # (the field names are checked against the data's)
            for name in ("table-compression", "row-dtype"):
                if name in o and not isinstance(o[name], str):
                    raise ValueError(f"{args.config}: [fields.{f}] {name} = {clip(o[name])}: must be a string, "
                                     f"not {type(o[name]).__name__}")
            try:
                if "table-compression" in o:
                    CompressionConfig.parse(o["table-compression"])
                if o.get("row-dtype", "float32") not in [d.value for d in RowDtype]:
                    raise ValueError(f"row_dtype must be one of {[d.value for d in RowDtype]}, got {clip(o['row-dtype'])}")
            except ValueError as e:
                raise ValueError(f"{args.config}: [fields.{f}]: {e}") from None
        train.set_defaults(**opts, schema=cfg.get("schema"), store_config=cfg.get("store"), fields=cfg.get("fields"))
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``damo-hybrid`` with ``argv`` (default: the process's); returns the exit status: 0 done,
    1 a check it ran failed, 2 bad input or a refusal, 3 the system refused, 70 a bug, 130/143
    interrupted, 141 the reader of its output went away (:mod:`damo_hybrid.cli.failure`)."""
    with sigterm_as_interrupt() as late:
        rc = _main(argv)
    return late.exit_code(rc)


def _main(argv: Sequence[str] | None) -> int:
    """The one error boundary: every exception becomes an exit status and one line on stderr
    (:func:`damo_hybrid.cli.failure.explain`); a traceback only for a bug (or with ``-v``)."""
    import traceback

    from . import failure

    args = None
    try:
        args = _parse(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        rc = _run(args)
        sys.stdout.flush()  # a reader gone (`| head`) shows here, inside the boundary, not at exit
        return rc
    except SystemExit:  # --help and --version print, then exit: their output may meet a closed pipe too
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return failure.reader_gone()
        raise
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            print("terminated (SIGTERM): stopped, and flushed what was trained", file=sys.stderr)
            return failure.SIGTERM
        print("interrupted", file=sys.stderr)
        return failure.SIGINT
    except Exception as e:  # noqa: BLE001 - the boundary: every failure becomes a status and a line
        if failure.broken_pipe(e):
            return failure.reader_gone()
        cmd = getattr(args, "cmd", None)
        f = failure.explain(e, cmd, failure.path_in(args))
        if f.bug or getattr(args, "verbose", False):
            traceback.print_exception(e)
        print(f"damo-hybrid{' ' + cmd if cmd else ''}: error: {f.line}", file=sys.stderr)
        return f.status


def _run(args: argparse.Namespace) -> int:
    """The command ``args`` names; its exit status."""
    if args.cmd in ("train", "demo"):
        from .bounds import check_memory

        check_memory(args)  # before anything is allocated
    if args.cmd == "bench":
        check_writable("--json", args.json)
        from .bench import run_bench

        if (rc := run_bench(args)) is not None:
            return rc
        from ..bench.store import run_store_bench

        return run_store_bench(args, log=print)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
