"""Training benchmark: damo_hybrid against the same model with in-memory torch embeddings.

Both sides train DeepFM (26 sparse fields, dim 16, MLP 400-400) on the same synthetic
Criteo-like batches, with Adagrad on the sparse rows and Adam on the dense layers, in one
process, one after the other:

- **torch**: the same :class:`~damo_hybrid.nn.models.DeepFM` with its rows in
  ``nn.Embedding(rows, dim, sparse=True)`` over keys modulo ``rows`` (a table that must fit in
  RAM; :mod:`damo_hybrid.bench.baseline`), ``torch.optim.Adagrad`` for the sparse parameters;
- **damo_hybrid**: every row in RocksDB behind a host cache whose budget is a fraction of the
  torch table's bytes (weights + Adagrad state), pipelined, one row per key (the first-order
  weight is the row's last column), the worker on all cores but one.

damo_hybrid is measured in steady state: it trains until its host cache evicts, ``warmup``
more steps, then times ``steps`` steps, with the per-stage breakdown of :mod:`damo_hybrid.timing`.
Throughput is the median samples/s over the timed steps.

``storages=("memory",)`` (``bench --train --storages rocksdb,memory``) runs damo_hybrid once more
with its rows in :class:`~damo_hybrid.storage.backend.MemoryStorage` (a dict, nothing persisted)
in place of RocksDB: not a configuration to train with, but the ceiling that shows what the
storage costs, everything else (tiers, pipeline, worker) unchanged. ``worker_threads`` sets the
worker's torch threads (default: every core but one); with more than that, set
``OMP_WAIT_POLICY=PASSIVE`` before the process starts, or the worker's idle OpenMP threads spin
on the cores the host side needs (the result records the policy).

With a data file (``bench --train --data FILE``) both sides train on its batches instead, read by
the streaming reader (damo_hybrid's in its loader thread), and the run reports how long the worker
waited for its input and the host manager for the loader: the loader must never starve the worker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import InitializerConfig, OptimizerConfig
from ..data.synthetic import SyntheticCriteo
from ..nn.models import DeepFM, model_tables
from ..pipeline.stages import worker_threads
from ..pipeline.trainer import Trainer, TrainSummary, peak_rss_mb
from ..storage.backend import MemoryStorage
from ..store import EmbeddingStore
from ..timing import CLOCK
from . import machine
from .baseline import InMemoryEmbeddings, modulo_index, train_in_memory

__all__ = ["run_train_bench", "fit_timed", "median_rate", "STAGES", "STORAGES"]

STORAGES = ("rocksdb", "memory")

_log = logging.getLogger(__name__)


def fit_timed(trainer: Trainer, steps: int) -> tuple[TrainSummary, list[float]]:
    """``trainer.fit(steps)`` with each step's wall time (step to step, as the caller sees it)."""
    times: list[float] = []
    last = [time.perf_counter()]

    def progress(step: int, loss: float) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    return trainer.fit(steps, progress=progress), times


class FileBatches:
    """Batches of a delimited file in a known format, streamed epoch after epoch (``--data``).

    Args:
        path: the file (or a glob or directory of them).
        batch_size: samples per batch.
        fmt: a format of :data:`~damo_hybrid.data.schema.FORMATS` (Criteo by default).
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int, fmt: str = "criteo") -> None:
        from ..data.schema import FORMATS
        from ..data.source import StreamSource
        from ..data.stream import DelimitedStream

        schema = FORMATS.get(fmt)
        if schema is None:
            raise ValueError(f"unknown data format {fmt!r}; known: {sorted(k for k, v in FORMATS.items() if v)}")
        self.source = StreamSource(DelimitedStream(path, schema, batch_size))
        self.batch_size = batch_size
        self.sparse_fields, self.dense_fields = self.source.sparse_fields, self.source.dense_fields

    def batch(self, i: int) -> Any:
        return self.source(i)


def median_rate(times: list[float], batch: int, warmup: int) -> float:
    steady = times[warmup:] if len(times) > warmup else times
    return batch / statistics.median(steady)


def bench_torch(data: SyntheticCriteo | FileBatches, rows: int, steps: int, warmup: int, dim: int, lr: float) -> dict[str, Any]:
    torch.manual_seed(0)
    rows_module = InMemoryEmbeddings(data.sparse_fields, rows, dim, modulo_index(rows), lin=True)
    m = DeepFM(None, data.sparse_fields, len(data.dense_fields), hidden=(400, 400), embedding_module=rows_module)
    times: list[float] = []
    loss = train_in_memory(m, data.batch, steps, lr, on_step=times.append)
    return {"samples_per_s": median_rate(times, data.batch_size, warmup), "table_rows": rows,
            "table_bytes": rows_module.table_bytes(), "loss": loss}


class _Done(Exception):
    """Ends a fit once the timed window is complete."""


# per-step figures of the breakdown: the clock's stages (ms) and item counts
STAGES = ("dedup", "index", "victims", "evict", "overlay", "rocksdb_read", "decode", "init", "encode",
          "rocksdb_write", "forward", "backward", "sparse_step", "dense_step")


def bench_damo(data: SyntheticCriteo | FileBatches, cache_mb: float, steps: int, warmup: int, dim: int, lr: float,
               root: Path, threads: int, prefetch: bool = True, max_warmup: int = 400,
               row_dtype: str = "float32", storage: str = "rocksdb", worker: int | None = None) -> dict[str, Any]:
    """Train until the host cache evicts (steady state), ``warmup`` more steps, then time ``steps``.

    Returns:
        samples/s (median of the timed steps), the per-step breakdown of the timed window
        (:data:`STAGES` in ms; unique keys, hits, keys read back, new keys, evictions,
        write-backs), and the run's cache figures.
    """
    torch.manual_seed(0)
    tables = [dataclasses.replace(t, row_dtype=row_dtype) for t in
              model_tables("deepfm", dim, OptimizerConfig.adagrad(lr), InitializerConfig.normal(std=0.01))]
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; known: {list(STORAGES)}")
    torch.set_num_threads(worker or worker_threads(threads, prefetch))
    opened = (EmbeddingStore(None, tables, storage=MemoryStorage()) if storage == "memory"
              else EmbeddingStore(root / f"store-{cache_mb:g}-{prefetch}-{row_dtype}", tables))
    with opened as store:
        model = DeepFM(store, data.sparse_fields, len(data.dense_fields), cache_mb=cache_mb, backend="cpu")
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), data.batch)
        caches = list(model.sparse.caches.values())
        window: dict[str, Any] = {}
        times: list[float] = []
        last = [0.0]

        def write_backs() -> int:
            return sum(c.stats.write_backs for c in caches)

        def progress(step: int, loss: float) -> None:
            now = time.perf_counter()
            evicting = sum(c.stats.evictions for c in caches) > 0
            if "start" not in window and (evicting or step >= max_warmup):
                window.update(start=step + warmup, filled=evicting, filled_at=step)
            if window.get("start") == step:  # the timed window begins after this step
                CLOCK.enable()
                window.update(t0=now, write_backs=write_backs(), stalls=_stalls(trainer), cpu=thread_cpu(),
                              cpu0=time.process_time())
            elif "t0" in window:
                times.append(now - last[0])
                if len(times) == steps:
                    stalls = {k: v - window["stalls"][k] for k, v in _stalls(trainer).items()}
                    cpu = {k: 1000.0 * (v - window["cpu"].get(k, 0.0)) / steps for k, v in thread_cpu().items()}
                    window.update(cpu=cpu, cpu_ms=1000.0 * (time.process_time() - window["cpu0"]) / steps)
                    window.update(seconds=CLOCK.snapshot(), counts=CLOCK.counts(), stalls=stalls, wall=now - window["t0"],
                                  write_backs=write_backs() - window["write_backs"])
                    CLOCK.disable()
                    raise _Done
            last[0] = now

        try:
            trainer.fit(max_warmup + warmup + steps + 1, progress=progress, prefetch=prefetch)
        except _Done:
            pass
        finally:
            CLOCK.disable()
        secs, counts = window["seconds"], window["counts"]
        per_step_ms = {k: 1000.0 * secs.get(k, 0.0) / steps for k in STAGES}
        keys = {"unique": counts.get("unique", 0) / steps, "hits": counts.get("hits", 0) / steps,
                "read_back": counts.get("rocksdb_read", 0) / steps, "new": counts.get("init", 0) / steps,
                "evictions": counts.get("evict", 0) / steps, "write_backs": window["write_backs"] / steps}
        return {"samples_per_s": median_rate(times, data.batch_size, 0), "cache_mb": cache_mb, "row_dtype": row_dtype,
                "storage": storage,
                "steady_after_steps": window["filled_at"], "cache_filled": window["filled"],
                "timed_steps": len(times), "torch_threads": torch.get_num_threads(),
                "hit_rate": keys["hits"] / keys["unique"] if keys["unique"] else 0.0,
                "per_step_ms": per_step_ms, "per_step_keys": keys,
                "cache_rows": sum(c.capacity for c in caches), "peak_rss_mb": peak_rss_mb(),
                # shares of the timed window's wall time: the worker waiting for its input (host
                # manager and loader together), the host manager waiting for the loader
                "worker_stall_share": window["stalls"]["worker_stall"] / window["wall"],
                "loader_wait_share": window["stalls"]["loader_wait"] / window["wall"],
                "load_ms": 1000.0 * window["stalls"]["load"] / steps,
                # CPU of the whole process per timed step, and by thread (main: the worker)
                "cpu_ms_per_step": window["cpu_ms"], "cpu_ms_by_thread": window["cpu"]}


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's live threads, summed by the group their name
    starts with: ``main`` (the worker), ``damo-worker`` (the second half of its dense part, on 2
    cores), ``damo-host``, ``damo-writer``, ``damo-read``, ``rocksdb`` ..., ``other`` (Linux; empty
    elsewhere). Threads that ended are not counted."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    main = str(os.getpid())
    names = {str(t.native_id): t.name for t in threading.enumerate()}  # Python names; RocksDB names its own
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        name = "main" if tid == main else _thread_group(names.get(tid, comm))
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _thread_group(comm: str) -> str:
    for prefix in ("damo-host", "damo-loader", "damo-writer", "damo-worker", "damo-read", "damo-parse", "damo-textparse",
                   "rocksdb"):
        if comm.startswith(prefix):
            return prefix
    return "other"


def _stalls(trainer: Trainer) -> dict[str, float]:
    ps = trainer.pipeline_stats
    return {"worker_stall": ps.worker_stall if ps else 0.0, "loader_wait": ps.loader_wait if ps else 0.0,
            "load": ps.load if ps else 0.0}


def run_train_bench(steps: int = 100, warmup: int = 20, rows: int = 4_200_000, fractions: tuple[float, ...] = (0.25, 0.05),
                    dim: int = 16, lr: float = 0.05, threads: int | None = None, max_warmup: int = 400,
                    batch: int = 4096, row_dtypes: tuple[str, ...] = ("float32",), data_path: str | None = None,
                    data_format: str = "criteo", storages: tuple[str, ...] = ("rocksdb",),
                    worker_threads: int | None = None, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """In-memory torch (all ``threads``), then damo_hybrid at each cache fraction in steady state
    (the worker on ``worker_threads(threads)``, a core left to the host side), once per row dtype
    (``float32``, or 16-bit rows: the same budget in bytes then holds more rows), and once per
    storage (``rocksdb``; ``memory``: the ceiling without the storage's cost).

    Torch is measured again after each damo_hybrid run, and each ratio is taken against the mean
    of the two torch runs around it: a shared machine's speed drifts over minutes, and this keeps
    the drift out of the ratios (``torch_runs`` holds every torch figure). ``data_path``: train
    both sides on that file's batches (streamed), not the synthetic ones.
    """
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    data = SyntheticCriteo(batch, seed=0) if data_path is None else FileBatches(data_path, batch, data_format)
    res: dict[str, Any] = {"steps": steps, "warmup": warmup, "threads": threads, "machine": machine(),
                           "data": str(data_path) if data_path else "synthetic",
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}

    def measure_torch() -> dict[str, Any]:
        torch.set_num_threads(threads)
        t = bench_torch(data, rows, steps + warmup, warmup, dim, lr)
        res.setdefault("torch_runs", []).append(t["samples_per_s"])
        return t

    t = res["torch"] = measure_torch()
    log(f"in-memory torch, {rows:,} rows ({t['table_bytes'] / 2**20:,.0f} MiB with Adagrad state), {threads} threads: "
        f"{t['samples_per_s']:,.0f} samples/s")
    res["damo"] = []
    before = t["samples_per_s"]
    with tempfile.TemporaryDirectory() as d:
        for frac, dtype, storage in [(f, x, s) for f in fractions for x in row_dtypes for s in storages]:
            mb = frac * t["table_bytes"] / 2**20
            try:
                r = bench_damo(data, mb, steps, warmup, dim, lr, Path(d), threads, max_warmup=max_warmup,
                               row_dtype=dtype, storage=storage, worker=worker_threads)
            except Exception as e:  # a budget too small for the batches in flight: report, go on
                log(f"damo_hybrid, cache {frac:.0%} of the table ({mb:,.0f} MiB): failed: {e}")
                res["damo"].append({"fraction": frac, "cache_mb": mb, "row_dtype": dtype, "storage": storage,
                                    "error": str(e)})
                continue
            finally:
                torch.set_num_threads(threads)
            after = measure_torch()["samples_per_s"]
            r["fraction"] = frac
            r["torch_samples_per_s"] = (before + after) / 2
            r["ratio_to_torch"] = r["samples_per_s"] / r["torch_samples_per_s"]
            before = after
            res["damo"].append(r)
            k, ms = r["per_step_keys"], r["per_step_ms"]
            where = "" if storage == "rocksdb" else ", rows in memory, not RocksDB (the ceiling)"
            log(f"damo_hybrid{where}, {dtype} rows, {r['torch_threads']} worker threads, cache {frac:.0%} of the "
                f"table ({mb:,.0f} MiB, {r['cache_rows']:,} rows, "
                f"hit rate {r['hit_rate']:.3f}), steady after {r['steady_after_steps']} "
                f"steps, {r['timed_steps']} timed: {r['samples_per_s']:,.0f} samples/s ({r['ratio_to_torch']:.2f}x "
                f"torch's {r['torch_samples_per_s']:,.0f}, the mean of the runs before and after)")
            log("  per step: " + ", ".join(f"{n} {v:,.0f}" for n, v in k.items()) + " keys")
            log("  per step ms: " + ", ".join(f"{n} {v:.1f}" for n, v in ms.items()))
            log(f"  CPU per step {r['cpu_ms_per_step']:.0f} ms: " + ", ".join(
                f"{n} {v:.0f}" for n, v in sorted(r["cpu_ms_by_thread"].items(), key=lambda x: -x[1]) if v >= 0.5))
            log(f"  worker waiting for its input {r['worker_stall_share']:.2%} of the time, host manager waiting "
                f"for the loader {r['loader_wait_share']:.2%}; loader {r['load_ms']:.1f} ms per batch")
    return res
