"""The ``damo-hybrid`` command: its subcommands and ``main``; with :mod:`.args` (argument
checking) the only package that prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import (
    OptimizerConfig,
    OptimizerKind,
    RowDtype,
    reject_unknown,
)
from ..data.schema import FORMATS
from ..errors import ConfigConflictError, DamoHybridError
from ..ops import Backend, resolve_backend
from ..storage.files import atomic_file
from ..store import EmbeddingStore
from . import failure, resume, stores
from .args import (
    Parser,
    check_writable,
    compression_arg,
    float_in,
    int_in,
    load_config,
    store_config,
)
from .bench import add_bench_arguments
from .data import NO_END, file_data, stream_data
from .demo import demo
from .signals import Terminated, sigterm_as_interrupt
from .tables import field_tables_of, model_tables_of

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    """A CTR model (DeepFM by default) on synthetic or Criteo TSV data, sparse rows in RocksDB;
    one rank of a sharded run under torchrun (:mod:`damo_hybrid.cli.distributed`)."""
    from .distributed import LAUNCHED, distributed_run, launch_local_ranks

    if args.nproc > 1 and LAUNCHED not in os.environ:  # this command again, on N local ranks under torchrun
        return launch_local_ranks(args)
    from .torchrun import quiet_failure

    with distributed_run(args) as ranks:
        try:
            return _train_run(args, ranks)
        except (DamoHybridError, KeyboardInterrupt, RuntimeError) as e:
            if ranks is not None and type(e) is RuntimeError:  # a collective no call site named: a lost rank?
                from ..dist.exchange import as_exchange_error

                if (lost := as_exchange_error(e, "collective")) is not e:
                    if (rc := quiet_failure(lost)) is not None:
                        return rc
                    raise lost from e
            if (rc := quiet_failure(e)) is None:  # what the launcher of the ranks reports for them
                raise
            return rc


def _train_run(args: argparse.Namespace, ranks: Any) -> int:
    import torch
    from tqdm import tqdm

    from ..data.synthetic import SyntheticCriteo
    from ..dist import (
        checkpoint as ckpts,  # either kind: one process's or a sharded run's
    )
    from ..nn.models import MODELS
    from ..pipeline.split import MIN_SPLIT, dense_parts
    from ..pipeline.stages import worker_threads
    from ..pipeline.checkpoint import check_model_class
    from ..pipeline.trainer import Trainer
    from .distributed import check_store_root

    torch.manual_seed(args.seed)
    # with prefetch the host manager needs a core of its own while torch computes; on 2 cores
    # the trainer runs the dense part in two halves at once, one torch thread each
    parts = (dense_parts() if ranks is None and resolve_backend(args.backend) is Backend.CPU
             and args.batch_size >= MIN_SPLIT else 1)
    threads = args.threads or worker_threads(prefetch=not args.no_prefetch, parts=parts)
    check_writable("--json", args.json)
    torch.set_num_threads(threads)
    if args.data and args.stream:
        data, held_out = stream_data(args, *((ranks.rank, ranks.world) if ranks is not None else (0, 1)))
        if ranks is not None and not getattr(data, "own_part", False) and args.rank_input == "own":
            print(f"note: --data {args.data} is fewer files than the {ranks.world} ranks and cannot be cut by byte "
                  f"(compressed or parquet), so every rank reads all of it and keeps its slice of each batch; give at "
                  f"least {ranks.world} files (a glob or a directory) to have each rank read only its own")
    elif args.data:
        data, held_out = file_data(args)
        if args.steps is None:
            args.steps = args.epochs * data.batches_per_epoch
        if held_out is not None:
            args.eval_batches = min(args.eval_batches, held_out.batches_per_epoch) if args.eval_batches else held_out.batches_per_epoch
        else:
            args.eval_batches = 0
    else:
        if args.vocab_max < args.vocab_min:
            raise ValueError(f"--vocab-max {args.vocab_max} is below --vocab-min {args.vocab_min}")
        data = SyntheticCriteo(args.batch_size, seed=args.seed, vocab_min=args.vocab_min, vocab_max=args.vocab_max)
        held_out = SyntheticCriteo(args.batch_size, seed=args.seed, vocab_min=args.vocab_min,
                                   vocab_max=args.vocab_max, split=1)
        if args.steps is None:
            args.steps = 150
    kind = OptimizerKind(args.optimizer)
    opt = OptimizerConfig(kind=kind, lr=args.lr)
    tables = model_tables_of(args, opt)
    more, field_tables = field_tables_of(args, opt, list(data.sparse_fields))
    if more and "lin" in {t.name for t in tables}:
        raise ValueError("[fields] options need the one-row layout; the store holds a separate lin table")
    tables += more
    store_cfg = store_config(getattr(args, "store_config", None))
    if args.allow_config_change:
        store_cfg = dataclasses.replace(store_cfg, allow_config_change=True)
    if (args.resume or args.checkpoint_every) and not args.store:
        raise ValueError("--resume and --checkpoint-every need --store (a temporary store is deleted at exit)")
    tmp = None if args.store else tempfile.TemporaryDirectory(prefix="damo-train-")
    # resolved: a --store that is a link is swapped at its target, and its identity is the target's
    store_dir = Path(args.store).resolve() if args.store else Path(tmp.name) / "store"  # type: ignore[union-attr]
    ckpt_root = Path(args.checkpoint_dir) if args.checkpoint_dir else store_dir.with_name(store_dir.name + ".ckpt")
    source = str(args.data) if args.data else "synthetic data"
    print(f"damo-hybrid {__version__}: {args.model} on {source}, {len(data.sparse_fields)} sparse + {len(data.dense_fields)} dense fields, "
          f"dim {args.dim}, batch {args.batch_size}, {args.steps if args.steps < NO_END else f'{args.epochs} epoch(s) of'} steps, {args.optimizer} lr {args.lr}, "
          f"cache {args.cache_mb} MiB, backend {resolve_backend(args.backend).value}, store {store_dir}")
    state = None
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    try:
        had = ckpts.any_checkpoint(ckpt_root)  # of either kind: this run may be on another number of ranks
        if had and args.checkpoint_every and not args.resume:
            raise ValueError(f"{ckpt_root} already holds checkpoints of an earlier run: pass --resume to continue it, "
                             "or give another --checkpoint-dir (or --store) to start anew")
        if args.store:
            resume.recover_swap(store_dir, print)
        identity = resume.run_identity(args, store_dir if ranks is None else store_dir.parent)
        found = None
        while args.resume:  # the newest checkpoint that verifies and restores; a damaged one is set aside
            found = ckpts.newest_checkpoint(ckpt_root, log=print, move_damaged=world == 1)
            if found is None:
                break
            ck, state = found
            check_model_class(state, MODELS[args.model].__name__, args.dense_mode, field_tables)  # before the store is touched
            resume.check_identity(ck, state.get("run"), identity, args.allow_run_change, print)
            if state.get("data") is not None and hasattr(data, "load_state"):
                data.load_state(state["data"])  # a stream read another way is refused here too
            # the store may hold work done after the checkpoint: restart from the checkpoint's copy,
            # built beside the store and swapped in by renames, so a kill never leaves a half store
            staging = resume.staging_dir(store_dir)
            shutil.rmtree(staging, ignore_errors=True)
            try:
                if ranks is None and not ckpts.is_sharded(ck):
                    EmbeddingStore.from_checkpoint(ck / "store", staging, tables, store_cfg).close()
                else:  # this rank's shard, re-sharded when the checkpoint was taken on another number of ranks
                    ckpts.restore_shard(ck, staging, rank, world, store_cfg, tables).close()
            except ConfigConflictError:  # this run's tables do not fit the checkpoint's: not damage
                shutil.rmtree(staging, ignore_errors=True)
                raise
            except (DamoHybridError, OSError, MemoryError) as e:
                shutil.rmtree(staging, ignore_errors=True)
                if (n := failure.system_refusal(e)) is not None:  # not damage: stop (exit 3), set nothing aside
                    raise OSError(n, os.strerror(n), str(store_dir.parent)) from e
                err = resume.restore_failed(ck, staging, e)
                if world > 1:
                    raise err from e  # ranks fall back only together
                ckpts.set_aside(ck, err, print)
                continue
            if ranks is not None:  # once every rank's copy is built: the stores of other numbers of ranks go
                ranks.clear_other_worlds(store_dir.parent)
            resume.swap_in(staging, store_dir)
            store = EmbeddingStore(store_dir, tables, store_cfg)
            print(f"resuming from {ck} at step {state['step']}")
            break
        if found is None:
            state = None
            if args.resume and (had or ckpts.set_aside_ones(ckpt_root)):  # never from scratch over a trained store
                raise DamoHybridError(f"no checkpoint under {ckpt_root} loads (see above; damaged ones are set aside "
                                      "as step-N.damaged-*); the store was not changed")
            if args.resume:
                print(f"no checkpoint under {ckpt_root}: starting from scratch")
            check_store_root(store_dir, ranks)
            store = EmbeddingStore(store_dir, tables, store_cfg)
        with store:
            if args.device_cache_mb is not None and resolve_backend(args.backend) is not Backend.CUDA:
                raise ValueError("--device-cache-mb needs the cuda backend (a GPU with CuPy); drop it to train on the CPU")
            model = MODELS[args.model](store, data.sparse_fields, len(data.dense_fields), cache_mb=args.cache_mb,
                                       backend=args.backend, device_cache_mb=args.device_cache_mb,
                                       dense_mode=args.dense_mode, field_tables=field_tables)
            floor = store_cfg.min_cache_rows
            at_floor = sorted(t for t, c in model.sparse.caches.items() if c.capacity == floor)
            if at_floor:
                print(f"note: --cache-mb {args.cache_mb:g} gives tables {', '.join(at_floor)} fewer rows than the floor "
                      f"of {floor:,} rows per table, so they hold {floor:,} rows "
                      f"({sum(c.capacity * c.nbytes_per_row(c.dim, c.width, c.prec.itemsize) for c in model.sparse.caches.values()) / 2**20:,.1f} MiB in all)")
            dense_opt = torch.optim.Adam(model.parameters(), lr=args.dense_lr)
            train_fn, eval_fn = getattr(data, "batch", data), getattr(held_out, "batch", held_out)
            if ranks is not None:  # this rank's slice of every global batch, unless it reads a part of its own
                train_fn, eval_fn = ranks.part(train_fn), ranks.part(eval_fn)
            trainer = Trainer(model, dense_opt, train_fn, eval_fn, identity=identity)
            if state is not None:
                trainer.load_state(state)
            remaining = max(0, args.steps - trainer.step)
            bar = tqdm(total=args.steps if args.steps < NO_END else None, initial=trainer.step, unit="step", disable=args.quiet, dynamic_ncols=True)
            t0 = time.perf_counter()
            step0 = trainer.step

            def progress(step: int, loss: float) -> None:
                bar.update(1)
                if step % 5 == 0 or step == args.steps:
                    # the top tier's hit rate: the device cache where there is one
                    st = list((model.sparse.device_cache_stats() or model.sparse.cache_stats()).values())
                    h = sum(s.hits for s in st)
                    n = h + sum(s.misses for s in st)
                    bar.set_postfix(samples_s=f"{(step - step0) * args.batch_size / (time.perf_counter() - t0):,.0f}",
                                    loss=f"{loss:.4f}", hit=f"{h / max(n, 1):.2f}")

            summary = trainer.fit(remaining, eval_batches=args.eval_batches, progress=progress,
                                  prefetch=not args.no_prefetch, checkpoint_every=args.checkpoint_every,
                                  checkpoint_dir=ckpt_root, eval_every=args.eval_every if held_out else 0,
                                  on_eval=lambda st, a, ll: bar.write(f"step {st}: eval AUC {a:.4f} logloss {ll:.4f}"))
            bar.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    s = summary
    print(f"samples/s {s.samples_per_s:,.0f}  train logloss {s.train_logloss:.4f}  "
          f"eval AUC {s.auc:.4f}  eval logloss {s.logloss:.4f}" if s.auc is not None else
          f"samples/s {s.samples_per_s:,.0f}  train logloss {s.train_logloss:.4f}")
    if s.device_hit_rate is not None:
        print(f"device cache hit rate {s.device_hit_rate:.3f}")
    print(f"cache hit rate {s.hit_rate:.3f}  evictions {s.evictions:,}  peak RSS {s.peak_rss_mb:,.0f} MiB  "
          f"stage seconds: load {s.stages.load:.1f} prepare {s.stages.prepare:.1f} compute {s.stages.compute:.1f} "
          f"apply {s.stages.apply:.1f}" + ("  (load/prepare overlap compute)" if not args.no_prefetch else ""))
    if args.json:
        with atomic_file(args.json) as f:
            f.write(json.dumps(s.as_dict(), indent=1).encode())
    return 0


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
    t.set_defaults(fn=_train)

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
