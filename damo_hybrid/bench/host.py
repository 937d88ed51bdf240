"""Host-manager microbenchmark: unique keys per second per core, and its scaling over threads.

Each thread owns one table (dim 16, Adagrad) with its host tier over one RocksDB store, and
loops over a Zipf stream of batches: de-duplicate, make the batch's rows resident and pinned
(index lookups, RocksDB reads of rows evicted earlier, initialisation of new keys, CLOCK
eviction with write-back to the background writer), step them, unpin. This is the host side
of one training step without the model. Every thread first runs until its tier evicts
(steady state), then the threads are timed together.

The figure a GPU needs: at batch 65,536 a synthetic Criteo step holds ``unique_per_step``
distinct keys per table, and a GPU step of ``gpu_step_ms`` must get them resident that fast.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import InitializerConfig, OptimizerConfig, TableConfig
from ..data.synthetic import SyntheticCriteo, zipf_keys
from ..keys.kernels import unique_inverse
from ..store import EmbeddingStore
from . import machine

__all__ = ["run_host_bench"]

_log = logging.getLogger(__name__)


def _worker(store: EmbeddingStore, table: str, seed: int, batch: int, vocab: int, batches: int, rows: int,
            warm: int, start: threading.Barrier, out: dict[str, Any]) -> None:
    """One host manager's run (:func:`_work`); what it raises is kept in ``out["error"]`` for the
    main thread to raise, and breaks the start barrier so that no other thread waits for it."""
    try:
        _work(store, table, seed, batch, vocab, batches, rows, warm, start, out)
    except BaseException as e:  # noqa: BLE001 - handed to the main thread
        out["error"] = e
        start.abort()


def _work(store: EmbeddingStore, table: str, seed: int, batch: int, vocab: int, batches: int, rows: int,
          warm: int, start: threading.Barrier, out: dict[str, Any]) -> None:
    tiers = store.cache_table(table, rows=rows)
    host, t = tiers.host, tiers.table
    rng = np.random.default_rng(seed)
    g = np.full((batch, t.dim), 1e-3, np.float32)

    def step(keys: np.ndarray) -> int:
        ukeys = unique_inverse(keys)[0]  # the host manager's de-dup
        with tiers.lock:
            slots = host.make_resident(ukeys, pin=True)
        try:
            with tiers.step_lock:  # the worker's sparse step: the compiled one, as the collection takes it
                staged = host.stage_checked(slots, g[:len(ukeys)], t.lr())
                host.commit_slots(slots, *(staged or host.stage_slots(slots, g[:len(ukeys)], t.lr())))
        finally:
            host.unpin(slots)
        return len(ukeys)

    try:
        i = 0
        while host.stats.evictions == 0 and i < warm:  # a stream of new batches until the tier evicts
            step(zipf_keys(rng, batch, vocab, field=seed))
            i += 1
        out["filled"], out["warm_batches"] = host.stats.evictions > 0, i
        timed = [zipf_keys(rng, batch, vocab, field=seed) for _ in range(batches)]  # drawn before the clock
    finally:
        start.wait()
    t0 = time.perf_counter()
    n = sum(step(k) for k in timed)
    out["seconds"] = time.perf_counter() - t0
    out["unique_keys"] = n


def bench_host(root: Path, threads: int, vocab: int, fraction: float, batch: int, batches: int,
               warm: int = 400) -> dict[str, Any]:
    """``threads`` host managers at once; unique keys/s in all and per core."""
    rows = max(batch, int(fraction * vocab))
    tables = [TableConfig(f"t{i}", 16, initializer=InitializerConfig.normal(std=0.01),
                          optimizer=OptimizerConfig.adagrad(0.05)) for i in range(threads)]
    outs: list[dict[str, Any]] = [{} for _ in range(threads)]
    with EmbeddingStore(root / f"host-{threads}", tables) as store:
        start = threading.Barrier(threads)
        ts = [threading.Thread(target=_worker, args=(store, f"t{i}", i, batch, vocab, batches, rows, warm, start, outs[i]))
              for i in range(threads)]
        for x in ts:
            x.start()
        for x in ts:
            x.join()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:  # the first thread's own error, not the broken barrier it left the others
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    wall = max(o["seconds"] for o in outs)
    total = sum(o["unique_keys"] for o in outs) / wall
    cores = min(threads, os.cpu_count() or 1)
    return {"threads": threads, "cores_used": cores, "unique_keys_per_s": total, "per_core": total / cores,
            "cache_rows": rows, "filled": all(o["filled"] for o in outs)}


def run_host_bench(threads: tuple[int, ...] = (1, 2, 4, 8), vocab: int = 2_000_000, fraction: float = 0.25,
                   batch: int = 4096 * 26, batches: int = 20, gpu_step_ms: float = 10.0,
                   log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """The microbenchmark at each thread count, and the rate a GPU step would need."""
    need = SyntheticCriteo(65536, seed=0).batch(0)
    unique_per_step = float(np.mean([len(np.unique(k)) for k in need.sparse.values()]) * len(need.sparse))
    res: dict[str, Any] = {"machine": machine(), "vocab": vocab, "fraction": fraction, "batch_keys": batch,
                           "gpu_unique_keys_per_step": unique_per_step, "gpu_step_ms": gpu_step_ms,
                           "gpu_needs_keys_per_s": unique_per_step / (gpu_step_ms / 1000.0), "runs": []}
    log(f"host manager, Zipf stream of {batch:,} keys per batch over {vocab:,} ids, cache {fraction:.0%}: "
        f"{res['machine']}")
    with tempfile.TemporaryDirectory() as d:
        for n in threads:
            r = bench_host(Path(d), n, vocab, fraction, batch, batches)
            res["runs"].append(r)
            log(f"  {n} thread(s) on {r['cores_used']} core(s): {r['unique_keys_per_s']:,.0f} unique keys/s, "
                f"{r['per_core']:,.0f} per core" + ("" if r["filled"] else " (cache never filled)"))
    log(f"a GPU step of {gpu_step_ms:g} ms at batch 65,536 (26 fields) needs {unique_per_step:,.0f} unique keys "
        f"resident per step: {res['gpu_needs_keys_per_s']:,.0f} keys/s")
    return res
