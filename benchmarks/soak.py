"""Soak: stream many distinct keys through a fixed host-cache budget and record, over time,
resident memory, throughput, disk bytes per stored row and RocksDB compactions.

Each step applies one gradient to a batch of keys: a share of never-seen keys (so the
number of distinct keys grows by ``batch * fresh`` per step) and Zipf(1.1)-hot keys among
those already seen (re-reads from the cache or from RocksDB). Every row goes through the
host cache: misses are read or initialised, evicted dirty rows are written back by the
background writer.

    python benchmarks/soak.py --keys 100000000 --cache-mb 1024 --out bench_out/soak.json

The JSON holds one sample per ``--sample-every`` steps; ``benchmarks/plots.py`` draws it.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import numpy as np

from damo_hybrid import EmbeddingStore, TableConfig
from damo_hybrid.cache.host import HostCache
from damo_hybrid.checks import clip
from damo_hybrid.cli.args import check_writable, float_in, int_in
from damo_hybrid.config import InitializerConfig, OptimizerConfig, StoreConfig
from damo_hybrid.data.synthetic import zipf_ranks
from damo_hybrid.keys.hashing import mix64
from damo_hybrid.storage.files import atomic_file


def rss_mb() -> dict[str, float]:
    """Resident memory now, MiB: ``total``, ``anon`` (the process's own: cache slab, RocksDB
    memtables and block cache, Python) and ``file`` (pages of memory-mapped SST files, which
    the kernel reclaims under pressure). Linux /proc; elsewhere only the peak total."""
    out = {"total": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "anon": float("nan"),
           "file": float("nan")}
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile")))
    except OSError:
        return out
    kb = {k: int(v.split()[0]) / 1024 for k, v in fields.items()}
    return {"total": kb.get("VmRSS", out["total"]), "anon": kb.get("RssAnon", float("nan")),
            "file": kb.get("RssFile", float("nan"))}


def run(keys: int, cache_mb: float, batch: int, fresh: float, dim: int, root: Path, sample_every: int,
        seed: int = 0, mmap_reads: bool = True, log=print) -> dict:
    tables = [TableConfig("t", dim, initializer=InitializerConfig.normal(std=0.01),
                          optimizer=OptimizerConfig.adagrad(0.05))]
    rng = np.random.default_rng(seed)
    n_fresh = max(1, int(batch * fresh))
    steps = -(-keys // n_fresh)
    samples = []
    with EmbeddingStore(root / "store", tables, StoreConfig(mmap_reads=mmap_reads)) as store:
        opt = store.table("t").opt
        capacity = int(cache_mb * 2**20 / HostCache.nbytes_per_row(dim, opt.width))
        cache = store.cache_table("t", capacity).host  # store.apply_gradients steps the rows in it
        log(f"soak: {keys:,} distinct keys in {steps:,} steps of {batch:,} ({n_fresh:,} new), "
            f"cache {cache_mb:,.0f} MiB = {capacity:,} rows, dim {dim}, adagrad; RSS at start {rss_mb()['total']:,.0f} MiB")
        seen = 0
        t_start = time.perf_counter()
        window: list[float] = []
        comp_flags: list[int] = []
        for step in range(steps):
            fresh_ids = np.arange(seen, seen + n_fresh, dtype=np.uint64)
            hot = zipf_ranks(rng, batch - n_fresh, max(seen, 1)).astype(np.uint64) if seen else fresh_ids[:0]
            k = mix64(np.concatenate([fresh_ids, hot]) ^ np.uint64(0x5EED))
            g = rng.standard_normal((len(k), dim), dtype=np.float32) * np.float32(0.01)
            t0 = time.perf_counter()
            store.apply_gradients("t", k, g)
            dt = time.perf_counter() - t0
            seen += n_fresh
            window.append(dt)
            comp_flags.append(store.running_compactions())
            if (step + 1) % sample_every == 0 or step == steps - 1:
                st = store.stats()
                s = {"step": step + 1, "elapsed_s": time.perf_counter() - t_start, "distinct_keys": seen,
                     **{f"rss_{k}_mb": v for k, v in rss_mb().items()}, "step_s_median": statistics.median(window),
                     "keys_per_s": batch / statistics.median(window), "disk_bytes": st.disk_bytes,
                     "rows_stored": st.rows, "compacting_share": float(np.mean(np.asarray(comp_flags) > 0)),
                     "step_s_compacting": statistics.median([w for w, c in zip(window, comp_flags) if c] or [0.0]),
                     "step_s_quiet": statistics.median([w for w, c in zip(window, comp_flags) if not c] or [0.0]),
                     "hit_rate": cache.stats.hit_rate, "evictions": cache.stats.evictions}
                samples.append(s)
                window, comp_flags = [], []
                log(f"step {s['step']:6d}  keys {seen:>13,}  RSS {s['rss_total_mb']:6,.0f} MiB "
                    f"(anon {s['rss_anon_mb']:6,.0f}, mapped files {s['rss_file_mb']:6,.0f})  "
                    f"{s['keys_per_s']:>9,.0f} keys/s  disk {st.disk_bytes / 2**30:6.2f} GiB "
                    f"({st.disk_bytes / max(st.rows, 1):.0f} B/row)  compacting {s['compacting_share']:.0%}")
        t0 = time.perf_counter()
        store.flush()
        flush_s = time.perf_counter() - t0
        st = store.stats()
    row_value = 4 * (5 + dim + opt.width + 1)  # header words + weights + state + checksum
    return {"keys": seen, "mmap_reads": mmap_reads, "cache_mb": cache_mb, "cache_rows": capacity, "batch": batch, "fresh": fresh, "dim": dim,
            "steps": steps, "elapsed_s": time.perf_counter() - t_start, "final_flush_s": flush_s,
            "rows_stored": st.rows, "disk_bytes": st.disk_bytes, "expected_bytes_per_row": row_value + 12,
            "samples": samples, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``soak.py: error: ...`` (exit status 2), without the usage."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())[:250]}\n")


def _count(text: str) -> int:
    """An argparse type: a whole number >= 1, also written as a float (``1e8``)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {clip(text)}") from None
    if not (math.isfinite(v) and v >= 1 and v == int(v)):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {clip(text)[1:-1]}")
    return int(v)


def _folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{clip(text)} is not a folder")
    return text


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=_count, default=10**8, help="distinct keys to stream (1e8 is accepted)")
    p.add_argument("--cache-mb", type=float_in(0.0), default=1024.0)
    p.add_argument("--batch", type=int_in(1), default=65536)
    p.add_argument("--fresh", type=float_in(0.0, 1.0, hi_open=False), default=0.75,
                   help="share of each batch that is never-seen keys, in (0, 1]")
    p.add_argument("--dim", type=int_in(1, 65535), default=16)
    p.add_argument("--sample-every", type=int_in(1), default=20)
    p.add_argument("--no-mmap", action="store_true", help="StoreConfig(mmap_reads=False): SST pages not mapped into RSS")
    p.add_argument("--dir", type=_folder, help="where the store goes (default: a temporary directory, removed after)")
    p.add_argument("--out", help="write the samples as JSON here")
    a = p.parse_args(argv)
    if a.out is not None and Path(a.out).parent.is_dir():  # (a missing folder is made at the end)
        try:
            check_writable("--out", a.out)
        except ValueError as e:
            p.error(str(e))
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        res = run(a.keys, a.cache_mb, a.batch, a.fresh, a.dim, Path(d), a.sample_every,
                  mmap_reads=not a.no_mmap)
    anon = [s["rss_anon_mb"] for s in res["samples"]]
    half = anon[len(anon) // 2:]
    print(f"done: {res['keys']:,} keys in {res['elapsed_s']:,.0f} s; anonymous RSS min/median/max over the second "
          f"half {min(half):,.0f}/{statistics.median(half):,.0f}/{max(half):,.0f} MiB; disk "
          f"{res['disk_bytes'] / max(res['rows_stored'], 1):.0f} B/row (value + key {res['expected_bytes_per_row']} B)")
    if a.out:  # beside it, then renamed: a failed write leaves the previous file whole
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(a.out) as f:
            f.write(json.dumps(res, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
