"""The training and held-out data of ``damo-hybrid train --data``: files loaded whole, or read
as streams in flat memory (``--stream``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..data.files import expand_paths
from ..data.libfm import LibfmStream
from ..data.parquet_stream import ParquetStream
from ..data.schema import FORMATS, Schema
from ..data.source import StreamSource
from ..data.stream import DelimitedStream, Holdout

NO_END = 2**62  # steps or eval batches "until the data ends"


def own_part(args: argparse.Namespace, path: Any, world: int) -> bool:
    """Whether each of ``world`` ranks reads only its part of ``path`` (``--rank-input own``): its
    files when there are at least as many as ranks, else its share of the bytes of plain text."""
    if world < 2 or path is None or getattr(args, "rank_input", "own") != "own":
        return False
    paths = expand_paths(path)
    return len(paths) >= world or (args.format != "parquet" and not any(p.suffix == ".gz" for p in paths))


def stream_data(args: argparse.Namespace, rank: int = 0, world: int = 1) -> tuple[Any, Any]:
    """``(training source, held-out source or None)``; sets ``args.steps`` and ``args.eval_batches``
    to run until the data ends where the user gave none (``--epochs`` passes, every held-out row).

    On ``world`` ranks with ``--rank-input own`` this rank reads only its part of the input (see
    :func:`own_part` and :mod:`damo_hybrid.dist.data`), in batches of its share of ``--batch-size``,
    and the sources are :class:`~damo_hybrid.dist.data.RankStream`; otherwise every rank reads it
    all (the caller gives each rank its slice of every batch)."""
    schema = Schema.from_dict(args.schema) if getattr(args, "schema", None) else FORMATS.get(args.format)
    if schema is None and args.format != "libfm":
        raise ValueError(f"format {args.format!r} needs a schema (columns, label, dense, sparse): give one in the config file")
    until_end = args.steps is None
    split = Holdout(args.eval_fraction, False, args.seed) if args.eval_fraction and not args.eval_data else None
    share = (rank + 1) * args.batch_size // world - rank * args.batch_size // world  # this rank's rows of a batch
    group = None

    def kind(path: Any, whole: bool = False, **kw: Any) -> Any:
        size = args.batch_size
        if not whole and own_part(args, path, world):
            kw["part"], size = (rank, world), share
        if args.format == "libfm":  # its schema comes from the file's first line
            return LibfmStream(path, size, schema.on_error if schema else "raise", **kw)
        return (ParquetStream if args.format == "parquet" else DelimitedStream)(path, schema, size, **kw)

    def source(path: Any, stream: Any, epochs: int | None) -> Any:
        nonlocal group
        src = StreamSource(stream, epochs=epochs)
        if not own_part(args, path, world):
            return src
        import torch.distributed as dist

        from ..dist.data import RankStream

        if group is None:  # every rank makes it, in the same order
            group = dist.new_group(backend="gloo")
        return RankStream(src, group)

    def rows_in(path: Any, stream: Any, holdout: Holdout | None) -> Any:
        """None where the stream holds a row, else what to say of it: a run that would train or
        score nothing is refused before any work (a rank asks of the whole input, as every rank does)."""
        if own_part(args, path, world):
            stream = kind(path, whole=True, holdout=holdout)
        if stream.holds_rows():
            return None
        n = len(stream.paths)
        return (f" ({stream.skipped:,} malformed lines skipped)" if stream.skipped
                else f" ({n} files: empty, or only headers)" if n > 1 else " (empty, or only a header)")

    train_stream = kind(args.data, holdout=split, shuffle_buffer=args.shuffle_buffer, seed=args.seed)
    held_stream = src = held = None
    if args.eval_data or split is not None:
        src = args.eval_data or args.data  # --eval-fraction: the other side of the same split
        held = Holdout(split.fraction, True, split.seed) if split is not None else None
        held_stream = kind(src, holdout=held)
    no_train = rows_in(args.data, train_stream, split)
    no_eval = rows_in(src, held_stream, held) if held_stream is not None else None
    if no_train is not None and (split is None or no_eval is not None):
        raise ValueError(f"--data {args.data} holds no rows{no_train}: nothing to train on")
    if no_train is not None:
        raise ValueError(f"--eval-fraction {args.eval_fraction} leaves no rows of {args.data} to train on: hold out less")
    if no_eval is not None and split is not None:
        raise ValueError(f"--eval-fraction {args.eval_fraction} holds out no rows of {args.data}: hold out more, "
                         "or give --eval-data")
    if no_eval is not None:
        raise ValueError(f"--eval-data {args.eval_data} holds no rows{no_eval}: nothing to evaluate on")
    data = source(args.data, train_stream, args.epochs if until_end else None)
    if until_end:
        args.steps = NO_END
    held_out = None
    if held_stream is not None:
        held_out = source(src, held_stream, 1)
        args.eval_batches = args.eval_batches or NO_END
    else:
        args.eval_batches = 0
    return data, held_out


def file_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The training file and held-out data: ``--eval-data``, or an ``--eval-fraction`` split."""
    from ..data.readers import read_dataset
    from ..data.schema import Schema

    if args.shuffle_buffer:
        raise ValueError("--shuffle-buffer shuffles a stream: add --stream")

    schema = Schema.from_dict(args.schema) if getattr(args, "schema", None) else None
    for opt, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and Path(path).is_dir():
            raise ValueError(f"{opt} {path} is a directory; give a data file")
    data = read_dataset(args.data, args.format, args.batch_size, schema)
    if data.skipped:
        print(f"{args.data}: {data.skipped:,} malformed lines skipped")
    short_epoch_note(data.n, args.batch_size, args.data)
    if args.eval_data:
        return data, read_dataset(args.eval_data, args.format, args.batch_size, schema)
    if args.eval_fraction:
        order = np.random.default_rng(args.seed).permutation(data.n)
        n_eval = max(1, int(round(args.eval_fraction * data.n)))
        if data.n - n_eval < 1:
            raise ValueError(f"--eval-fraction {args.eval_fraction} leaves none of the {data.n:,} rows of {args.data} "
                             "to train on; hold out less")
        return data.take(np.sort(order[n_eval:])), data.take(np.sort(order[:n_eval]))
    return data, None


def short_epoch_note(rows: int, batch_size: int, path: object, min_steps: int = 50) -> None:
    """Warn when an epoch is too few steps to train a model (the default batch of 4,096 on an
    8k-row file is 2 steps), and suggest a batch size that gives ``min_steps``."""
    steps = -(-rows // batch_size)
    if steps < min_steps:
        suggest = max(16, 1 << max(0, (rows // min_steps).bit_length() - 1))
        print(f"note: an epoch of {path} ({rows:,} rows) is {steps} step(s) at --batch-size {batch_size}: too few to "
              f"train a model well; --batch-size {suggest} gives {-(-rows // suggest)} steps per epoch")
