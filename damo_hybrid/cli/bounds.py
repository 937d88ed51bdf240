"""The memory a command asks for, checked before it allocates anything
(:mod:`damo_hybrid.resources`): ``train`` and ``demo`` here, the benchmarks in
:func:`damo_hybrid.cli.bench.check_bench_args`, the host caches wherever they are made
(:class:`~damo_hybrid.cache.registry.TierRegistry`).

Prints nothing; raises :class:`~damo_hybrid.errors.InsufficientMemoryError` naming the option.
"""

from __future__ import annotations

import argparse
import os

from .. import resources
from ..resources import check_fits, step_bytes_per_sample

__all__ = ["check_memory"]

_SYNTHETIC = (26, 13)  # SyntheticCriteo's sparse and dense fields
_HIDDEN = (400, 400)  # the built-in models' MLP widths
_DEMO_BYTES_PER_KEY = 256  # a key, its row read back (bytes objects), its gradient, the write batch


def _fields(args: argparse.Namespace) -> tuple[int, int] | None:
    """Sparse and dense fields of the training input, where known before reading it."""
    from ..data.schema import FORMATS, Schema

    if not args.data:
        return _SYNTHETIC
    schema = FORMATS.get(args.format)
    if getattr(args, "schema", None):
        try:
            schema = Schema.from_dict(args.schema)
        except (TypeError, ValueError, KeyError):
            return None  # reported when the data is read
    if schema is None:  # libfm: its width is the file's
        return None
    return len(schema.sparse), len(schema.dense)


def check_memory(args: argparse.Namespace) -> None:
    """Refuse a ``train`` or ``demo`` command whose batches and caches cannot fit in memory.

    Raises:
        InsufficientMemoryError: one line naming ``--batch-size`` or ``--cache-mb``.
    """
    from .distributed import LAUNCHED

    avail = resources.available_bytes()
    if avail is None or LAUNCHED in os.environ:  # a local rank: its launcher checked for every rank
        return
    if args.cmd == "demo":
        per = args.fields * _DEMO_BYTES_PER_KEY
        fits = max(1, avail // per)
        check_fits([(f"batches at --batch-size {args.batch_size:,} and --fields {args.fields}", args.batch_size * per)],
                   f"lower --batch-size (about {fits:,} fits) or --fields", "demo", avail)
        return
    if args.cmd != "train":
        return
    fields = _fields(args)
    n_sparse, n_dense = fields if fields is not None else (0, 0)
    if fields is not None and args.dense_mode == "autodis":
        n_sparse += n_dense  # AutoDis embeds the dense fields too
    per = step_bytes_per_sample(n_sparse, n_dense, args.dim, _HIDDEN) if fields is not None else 0
    batch = args.batch_size * per
    cache = args.cache_mb * 2**20 * max(1, args.nproc)  # each local rank holds its own caches
    if batch >= cache:
        fix = f"lower --batch-size (about {max(1, int((avail - cache) // per)) if avail > cache else 1:,} fits)"
    else:
        fix = "lower --cache-mb"
    check_fits([(f"batch buffers at --batch-size {args.batch_size:,}, --dim {args.dim}", batch),
                (f"host caches at --cache-mb {args.cache_mb:,.0f}" + (f" on {args.nproc} ranks" if args.nproc > 1 else ""),
                 cache)], fix, "train", avail)
