"""Store benchmark: lookup and apply_gradients keys/s straight from RocksDB (no cache).

Run with ``damo-hybrid bench`` or ``python benchmarks/store_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import InitializerConfig, OptimizerConfig, TableConfig
from ..storage.files import atomic_file
from ..store import EmbeddingStore
from . import machine

__all__ = ["run_store_bench", "bench_store"]

_log = logging.getLogger(__name__)


def _build(store: EmbeddingStore, table: str, keys: np.ndarray, dim: int, chunk: int = 65536) -> float:
    t0 = time.perf_counter()
    g = np.zeros((chunk, dim), np.float32)
    for i in range(0, len(keys), chunk):
        k = keys[i:i + chunk]
        store.apply_gradients(table, k, g[:len(k)])
    store.flush()
    return len(keys) / (time.perf_counter() - t0)


def _rate(fn, batches: list[np.ndarray]) -> float:
    """Median keys/s of ``fn(keys)`` over the batches."""
    times = []
    for keys in batches:
        t0 = time.perf_counter()
        fn(keys)
        times.append(time.perf_counter() - t0)
    return len(batches[0]) / statistics.median(times)


def bench_store(root: Path, rows: int, dim: int, batches: list[int], repeats: int, flat_steps: int,
                log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Measure one (rows, dim) configuration. Returns a JSON-ready dict."""
    rng = np.random.default_rng(dim)
    keys = np.unique(rng.integers(0, 2**63, size=int(rows * 1.01), dtype=np.int64).view(np.uint64))[:rows]
    rng.shuffle(keys)
    table = TableConfig("bench", dim, initializer=InitializerConfig.normal(std=0.01), optimizer=OptimizerConfig.sgd(0.01))
    res: dict[str, Any] = {"rows": rows, "dim": dim, "results": []}
    with EmbeddingStore(root / f"d{dim}", [table]) as store:
        res["build_keys_per_s"] = _build(store, "bench", keys, dim)
        res["compaction_wait_s"] = store.wait_for_compactions()
        res["disk_bytes"] = store.stats().disk_bytes
        log(f"dim {dim}: built {rows:,} rows at {res['build_keys_per_s']:,.0f} keys/s, "
            f"{res['disk_bytes'] / 2**30:.2f} GiB on disk, compactions settled after {res['compaction_wait_s']:.1f} s")
        for b in batches:
            stored = [keys[rng.choice(len(keys), size=b, replace=False)] for _ in range(repeats)]
            unseen = [rng.integers(2**63, 2**64 - 1, size=b, dtype=np.uint64) for _ in range(repeats)]
            updated = [keys[rng.choice(len(keys), size=b, replace=False)] for _ in range(repeats)]
            grads = np.full((b, dim), 1e-3, np.float32)
            look = _rate(lambda k: store.lookup("bench", k), stored)
            oov = _rate(lambda k: store.lookup("bench", k), unseen)
            apply = _rate(lambda k, g=grads: store.apply_gradients("bench", k, g), updated)
            row = {"batch": b, "lookup_keys_per_s": look, "lookup_unseen_keys_per_s": oov,
                   "apply_keys_per_s": apply}
            res["results"].append(row)
            log(f"  batch {b:6d}: lookup {look:10,.0f} keys/s   lookup unseen {oov:10,.0f} keys/s   "
                f"apply_gradients {apply:10,.0f} keys/s")
        b = batches[-1]
        same = keys[rng.choice(len(keys), size=b, replace=False)]
        g = np.full((b, dim), 1e-3, np.float32)
        step_s, look_s = [], []
        for _ in range(flat_steps):
            t0 = time.perf_counter()
            store.apply_gradients("bench", same, g)
            t1 = time.perf_counter()
            store.lookup("bench", same)
            step_s.append(t1 - t0)
            look_s.append(time.perf_counter() - t1)
        k = max(1, flat_steps // 10)
        res["flat"] = {
            "batch": b, "steps": flat_steps,
            "apply_first_keys_per_s": b / statistics.median(step_s[:k]),
            "apply_last_keys_per_s": b / statistics.median(step_s[-k:]),
            "lookup_first_keys_per_s": b / statistics.median(look_s[:k]),
            "lookup_last_keys_per_s": b / statistics.median(look_s[-k:]),
        }
        f = res["flat"]
        log(f"  same {b} keys updated {flat_steps}x: apply {f['apply_first_keys_per_s']:,.0f} -> "
            f"{f['apply_last_keys_per_s']:,.0f} keys/s, lookup {f['lookup_first_keys_per_s']:,.0f} -> "
            f"{f['lookup_last_keys_per_s']:,.0f} keys/s (first vs last {k} steps)")
    return res


def run_store_bench(args: argparse.Namespace, log: Callable[[str], None] = _log.info) -> int:
    dims = [int(x) for x in str(args.dims).split(",")]
    batches = [int(x) for x in str(args.batches).split(",")]
    out: dict[str, Any] = {
        "machine": machine(),
        "repeats": args.repeats, "configs": [],
    }
    log(f"store benchmark on {out['machine']}: {args.rows:,} rows, dims {dims}, batches {batches}, "
          f"median of {args.repeats}")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for dim in dims:
            out["configs"].append(bench_store(Path(d), args.rows, dim, batches, args.repeats, args.flat_steps, log))
    if args.json:  # beside it, then renamed: a failed write leaves the previous report whole
        with atomic_file(args.json) as f:
            f.write(json.dumps(out, indent=1).encode())
        log(f"wrote {args.json}")
    return 0
