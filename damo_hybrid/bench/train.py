"""Training benchmark: damo_hybrid against the same model with in-memory torch embeddings.

Both sides train DeepFM (26 sparse fields, dim 16, MLP 400-400) on the same synthetic
Criteo-like batches, with Adagrad on the sparse rows and Adam on the dense layers, in one
process, one after the other:

- **torch**: the same :class:`~damo_hybrid.nn.models.DeepFM` with its rows in
  ``nn.Embedding(rows, dim, sparse=True)`` over keys modulo ``rows`` (a table that must fit in
  RAM; :mod:`damo_hybrid.bench.baseline`), ``torch.optim.Adagrad`` for the sparse parameters;
- **damo_hybrid**: every row in RocksDB behind a host cache whose budget is a fraction of the
  torch table's bytes (weights + Adagrad state), pipelined.

Throughput is the median samples/s over the steps after ``warmup``.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import InitializerConfig, OptimizerConfig, TableConfig
from ..data.synthetic import SyntheticCriteo
from ..nn.models import DeepFM
from ..pipeline.trainer import Trainer, TrainSummary, peak_rss_mb
from ..store import EmbeddingStore
from .baseline import InMemoryEmbeddings, modulo_index, train_in_memory

__all__ = ["run_train_bench", "fit_timed", "median_rate"]

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


def median_rate(times: list[float], batch: int, warmup: int) -> float:
    steady = times[warmup:] if len(times) > warmup else times
    return batch / statistics.median(steady)


def bench_torch(data: SyntheticCriteo, rows: int, steps: int, warmup: int, dim: int, lr: float) -> dict[str, Any]:
    torch.manual_seed(0)
    rows_module = InMemoryEmbeddings(data.sparse_fields, rows, dim, modulo_index(rows), lin=True)
    m = DeepFM(None, data.sparse_fields, len(data.dense_fields), hidden=(400, 400), embedding_module=rows_module)
    times: list[float] = []
    loss = train_in_memory(m, data.batch, steps, lr, on_step=times.append)
    return {"samples_per_s": median_rate(times, data.batch_size, warmup), "table_rows": rows,
            "table_bytes": rows_module.table_bytes(), "loss": loss}


def bench_damo(data: SyntheticCriteo, cache_mb: float, steps: int, warmup: int, dim: int, lr: float,
               root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    opt = OptimizerConfig.adagrad(lr)
    tables = [TableConfig("emb", dim, initializer=InitializerConfig.normal(std=0.01), optimizer=opt),
              TableConfig("lin", 1, initializer=InitializerConfig.zeros(), optimizer=opt)]
    with EmbeddingStore(root / f"store-{cache_mb:g}", tables) as store:
        model = DeepFM(store, data.sparse_fields, len(data.dense_fields), cache_mb=cache_mb, backend="cpu")
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), data.batch)
        s, times = fit_timed(trainer, steps)
        ps = trainer.pipeline_stats
        stats = list(model.sparse.cache_stats().values())
        return {"samples_per_s": median_rate(times, data.batch_size, warmup), "cache_mb": cache_mb,
                "hit_rate": s.hit_rate, "evictions": s.evictions, "loss": s.train_logloss,
                "stage_s": {"load": s.stages.load, "prepare": s.stages.prepare, "compute": s.stages.compute,
                            "apply": s.stages.apply, "worker_stall": ps.worker_stall if ps else 0.0},
                "cache_rows": sum(c.capacity for c in model.sparse.caches.values()),
                "write_backs": sum(st.write_backs for st in stats), "peak_rss_mb": peak_rss_mb()}


def run_train_bench(steps: int = 60, warmup: int = 10, rows: int = 4_200_000, fractions: tuple[float, ...] = (0.25, 0.05),
                    dim: int = 16, lr: float = 0.05, threads: int = 2,
                    log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    torch.set_num_threads(threads)
    data = SyntheticCriteo(4096, seed=0)
    res: dict[str, Any] = {"steps": steps, "warmup": warmup, "threads": threads}
    t = bench_torch(data, rows, steps, warmup, dim, lr)
    res["torch"] = t
    log(f"in-memory torch, {rows:,} rows ({t['table_bytes'] / 2**20:,.0f} MiB with Adagrad state): "
        f"{t['samples_per_s']:,.0f} samples/s")
    res["damo"] = []
    with tempfile.TemporaryDirectory() as d:
        for frac in fractions:
            mb = frac * t["table_bytes"] / 2**20
            try:
                r = bench_damo(data, mb, steps, warmup, dim, lr, Path(d))
            except Exception as e:  # a budget too small for the batches in flight: report, go on
                log(f"damo_hybrid, cache {frac:.0%} of the table ({mb:,.0f} MiB): failed: {e}")
                res["damo"].append({"fraction": frac, "cache_mb": mb, "error": str(e)})
                continue
            r["fraction"] = frac
            r["ratio_to_torch"] = r["samples_per_s"] / t["samples_per_s"]
            res["damo"].append(r)
            log(f"damo_hybrid, cache {frac:.0%} of the table ({mb:,.0f} MiB): {r['samples_per_s']:,.0f} samples/s "
                f"({r['ratio_to_torch']:.2f}x torch), hit rate {r['hit_rate']:.3f}, evictions {r['evictions']:,}, "
                f"peak RSS {r['peak_rss_mb']:,.0f} MiB, stages {r['stage_s']}")
    return res
