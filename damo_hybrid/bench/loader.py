"""Loader benchmark: Criteo TSV parsed, hashed and batched by the streaming reader, in rows/s and RSS.

The benchmark writes its own Criteo-format file (``rows`` lines: a label, 13 counts with 20%
missing, 26 hex ids of 1-8 characters with 10% missing; a block of distinct lines repeated, which
changes nothing for a parser), plain, gzip and parquet (row groups of 2^20 rows), then streams
each through :class:`~damo_hybrid.data.stream.DelimitedStream` (or
:class:`~damo_hybrid.data.parquet_stream.ParquetStream`) into batches of ``batch`` rows. It reports rows/s
(median of ``repeats`` passes) and the process's resident memory sampled every 2% of the file, so
that a flat curve shows memory does not grow with the file; from rows/s it projects the full
Criteo Kaggle set (45,840,617 rows). Each text pass is followed by one of the same file through
the pyarrow path (``compiled=False``, the reader before the compiled fast path): the baseline,
measured beside it.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data.parquet_stream import ParquetStream
from ..data.schema import FORMATS
from ..data.stream import DelimitedStream
from ..storage.files import atomic_file
from . import CheckFailed, machine

__all__ = ["run_loader_bench", "write_criteo_file"]

_log = logging.getLogger(__name__)
KAGGLE_ROWS = 45_840_617


def _lines(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n).astype(str)
    cols = [label]
    for _ in range(13):
        v = rng.integers(0, 5000, n).astype(str).astype(object)
        v[rng.random(n) < 0.2] = ""
        cols.append(v)
    for _ in range(26):
        h = np.char.mod("%08x", rng.integers(0, 2**32, n, dtype=np.uint64)).astype(object)
        ln = rng.integers(1, 9, n)
        v = np.array([s[:k] for s, k in zip(h, ln)], dtype=object)
        v[rng.random(n) < 0.1] = ""
        cols.append(v)
    rows = ["\t".join(r) for r in zip(*cols)]
    return ("\n".join(rows) + "\n").encode()


def write_criteo_file(path: Path, rows: int, distinct: int = 100_000, seed: int = 0) -> int:
    """Write ``rows`` Criteo-format lines (``distinct`` of them, repeated) to ``path`` (gzip if
    it ends in .gz), beside it and renamed into place (a failed write, a full disk, leaves what
    was there); returns the bytes of the plain text."""
    block = _lines(min(rows, distinct), seed)
    per = min(rows, distinct)
    written = 0
    with atomic_file(path) as out, (gzip.GzipFile(Path(path).name, "wb", fileobj=out) if Path(path).suffix == ".gz"
                                    else contextlib.nullcontext(out)) as f:
        left = rows
        while left:
            if left >= per:
                f.write(block)
                written += len(block)
                left -= per
            else:
                part = b"".join(block.splitlines(keepends=True)[:left])
                f.write(part)
                written += len(part)
                left = 0
    return written


def write_parquet(tsv: Path, path: Path, row_group: int = 1 << 20) -> None:
    """The Criteo TSV as parquet (label and counts as numbers, ids as strings), row groups of ``row_group`` rows."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    s = FORMATS["criteo"]
    assert s is not None
    types = {s.label: pa.int8(), **{c: pa.int32() for c in s.dense}, **{c: pa.string() for c in s.sparse}}
    reader = pacsv.open_csv(tsv, read_options=pacsv.ReadOptions(column_names=list(s.columns), block_size=1 << 26),
                            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
    with pq.ParquetWriter(path, reader.schema) as w:
        for batch in reader:
            w.write_table(pa.Table.from_batches([batch]), row_group_size=row_group)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pass(path: Path, batch: int, block_mb: float, rows: int, sample: bool,
          compiled: bool = True) -> tuple[float, list[tuple[float, float]]]:
    s = FORMATS["criteo"]
    assert s is not None
    if path.suffix == ".parquet":
        stream: DelimitedStream = ParquetStream(path, replace(s, columns=()), batch_size=batch)
    else:
        stream = DelimitedStream(path, s, batch_size=batch, block_mb=block_mb, compiled=compiled)
    curve: list[tuple[float, float]] = []
    step = max(1, rows // batch // 50)
    n = 0
    t0 = time.perf_counter()
    for i, (b, _) in enumerate(stream.batches()):
        n += len(b.label)
        if sample and i % step == 0:
            curve.append((n / rows, _rss_mb()))
    dt = time.perf_counter() - t0
    if n != rows:
        raise CheckFailed(f"the streaming reader read {n:,} rows of the {rows:,} in {path.name}")
    return n / dt, curve


def run_loader_bench(rows: int = 10_000_000, batch: int = 4096, block_mb: float = 8.0, repeats: int = 3,
                     root: str | None = None, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Write the file (plain and gzip), then stream each ``repeats`` times."""
    res: dict[str, Any] = {"rows": rows, "batch": batch, "block_mb": block_mb, "machine": machine(), "formats": {}}
    d = Path(tempfile.mkdtemp(prefix="damo-loader-", dir=root))
    try:
        for fmt in ("tsv", "tsv.gz", "parquet"):
            path = d / f"criteo.{fmt}"
            t0 = time.perf_counter()
            if fmt == "parquet":  # from the plain file, kept until here
                write_parquet(d / "criteo.tsv", path)
                (d / "criteo.tsv").unlink()
                text_bytes = 0
            else:
                text_bytes = write_criteo_file(path, rows)
            log(f"wrote {path.name}: {rows:,} rows, {path.stat().st_size / 2**20:,.0f} MiB on disk "
                + (f"({text_bytes / 2**20:,.0f} MiB of text) " if text_bytes else "") + f"in {time.perf_counter() - t0:.0f} s")
            rss0 = _rss_mb()
            rates, curve, arrow = [], [], []
            for r in range(repeats):
                rate, c = _pass(path, batch, block_mb, rows, sample=r == 0)
                rates.append(rate)
                curve = curve or c
                if fmt != "parquet":  # the pyarrow path, pass for pass beside it: the baseline
                    arrow.append(_pass(path, batch, block_mb, rows, sample=False, compiled=False)[0])
            med = statistics.median(rates)
            peak = max(m for _, m in curve)
            first = [m for f, m in curve if f >= 0.1][0]
            res["formats"][fmt] = {"rows_per_s": med, "passes": rates, "rss_curve": curve, "rss_before_mb": rss0,
                                   "rss_peak_mb": peak, "rss_at_10pct_mb": first, "rss_growth_mb": peak - first,
                                   "kaggle_projection_s": KAGGLE_ROWS / med}
            if arrow:
                res["formats"][fmt].update(pyarrow_rows_per_s=statistics.median(arrow), pyarrow_passes=arrow,
                                           vs_pyarrow=med / statistics.median(arrow))
                log(f"{fmt}, pyarrow path (the previous reader, measured beside it): "
                    f"{statistics.median(arrow):,.0f} rows/s; the compiled path is {med / statistics.median(arrow):.2f}x")
            log(f"{fmt}: {med:,.0f} rows/s (median of {repeats}), RSS {rss0:,.0f} MiB before, {first:,.0f} at 10% "
                f"of the file, peak {peak:,.0f} (growth {peak - first:+,.0f} MiB from 10% to the end); "
                f"the Criteo Kaggle set's {KAGGLE_ROWS:,} rows would take {KAGGLE_ROWS / med / 60:,.1f} min")
            if fmt != "tsv":
                path.unlink()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res
