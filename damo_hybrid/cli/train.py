"""``damo-hybrid train``: a CTR model (DeepFM by default) on synthetic or Criteo TSV data, its
sparse rows in RocksDB; with ``--resume`` it continues a checkpoint (:mod:`.resume`), and under
torchrun it runs one rank of a sharded run (:mod:`.distributed`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import OptimizerConfig, OptimizerKind
from ..errors import ConfigConflictError, DamoHybridError
from ..ops import Backend, resolve_backend
from ..storage.files import atomic_file
from ..store import EmbeddingStore
from . import failure, resume
from .args import check_writable, store_config
from .data import NO_END, file_data, stream_data
from .tables import field_tables_of, model_tables_of

__all__ = ["train"]


def train(args: argparse.Namespace) -> int:
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
