"""GPU tier benchmark: damo_hybrid's device cache against every row in accelerator memory.

Three runs of the same model (DeepFM or DLRM, dim 16, Adagrad on the sparse rows, Adam on the
dense layers) on the same synthetic Criteo-like batches, one after the other in one process:

- **hbm**: every row of a ``rows``-row table in ``nn.Embedding(sparse=True)`` on the device,
  keys taken modulo ``rows``, ``torch.optim.Adagrad`` (the upper bound);
- **device**: damo_hybrid with the device cache holding ``device_fraction`` of ``rows`` (and
  the host cache ``host_fraction``), every row in RocksDB, pipelined;
- **cpu**: damo_hybrid on the CPU backend, host cache ``host_fraction``, pipelined.

Throughput is the median samples/s over the steps after ``warmup`` (each step ends with the
loss on the host, so GPU work is included). The dense modules are the package's own model
classes on every side; only where rows come from differs. With ``trace``, a
``torch.profiler`` Chrome trace of the device run is written, showing the copy stream, the
compute stream and the host-manager thread side by side.

Without CUDA the ``hbm`` and ``device`` runs use the CPU device (the device tier then runs in
host memory): a smoke test of this script, not a measurement of the GPU tier.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..cache.device import DeviceCache
from ..cache.host import HostCache
from ..config import InitializerConfig, OptimizerConfig
from ..data.synthetic import SyntheticCriteo
from ..nn.models import MODELS, model_tables
from ..ops import cuda_available
from ..pipeline.trainer import Trainer
from ..store import EmbeddingStore
from .baseline import InMemoryEmbeddings, modulo_index, train_in_memory
from .train import fit_timed, median_rate

__all__ = ["run_gpu_bench"]

log = logging.getLogger(__name__)


def _model_kw(model: str) -> dict[str, Any]:
    return {"hidden": (400, 400)} if model == "deepfm" else {"bottom": (64,), "top": (400, 400)}


def _bench_hbm(model: str, data: SyntheticCriteo, rows: int, dim: int, steps: int, warmup: int, lr: float,
               device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    emb = InMemoryEmbeddings(data.sparse_fields, rows, dim, modulo_index(rows), lin=model == "deepfm", device=device)
    m = MODELS[model](None, data.sparse_fields, len(data.dense_fields), embedding_module=emb, **_model_kw(model))
    m.to(device)
    times: list[float] = []
    train_in_memory(m, data.batch, steps, lr, on_step=times.append)
    return {"samples_per_s": median_rate(times, data.batch_size, warmup), "table_rows": rows,
            "device_bytes": emb.table_bytes()}


def _bench_damo(model: str, data: SyntheticCriteo, rows: int, dim: int, steps: int, warmup: int, lr: float,
                backend: str, device_fraction: float | None, host_fraction: float, root: Path,
                trace: Path | None) -> dict[str, Any]:
    torch.manual_seed(0)
    tables = model_tables(model, dim, OptimizerConfig.adagrad(lr), InitializerConfig.normal(std=0.01))
    dims = [t.dim for t in tables]  # Adagrad keeps one state value per weight: width == dim
    # budgets split across tables in equal row counts (see EmbeddingCollection): each table gets fraction * rows
    host_mb = host_fraction * rows * sum(HostCache.nbytes_per_row(x, x) for x in dims) / 2**20
    dev_mb = None
    if device_fraction is not None:
        dev_mb = device_fraction * rows * sum(DeviceCache.nbytes_per_row(x, x) for x in dims) / 2**20
    with EmbeddingStore(root / f"{model}-{backend}-{device_fraction}", tables) as store:
        m = MODELS[model](store, data.sparse_fields, len(data.dense_fields), cache_mb=host_mb, backend=backend,
                          device_cache_mb=dev_mb, **_model_kw(model))
        trainer = Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-3), data.batch)
        if trace is not None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
            trainer.fit(warmup)
            with profile(activities=acts) as prof:
                trainer.fit(min(10, steps))
            trace.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace))
        trainer.timeline = []
        summary, times = fit_timed(trainer, steps)
        ps = trainer.pipeline_stats
        out = {"samples_per_s": median_rate(times, data.batch_size, warmup), "backend": trainer.device.type,
               "host_cache_mb": host_mb, "device_cache_mb": dev_mb,
               "device_cache_rows": sum(c.capacity for c in m.sparse.device_caches.values()) or None,
               "host_hit_rate": summary.hit_rate, "device_hit_rate": summary.device_hit_rate,
               "device_evictions": sum(s.evictions for s in m.sparse.device_cache_stats().values()),
               "stages": dict(summary.stages.__dict__),
               "pipeline": {k: v for k, v in ps.__dict__.items() if k != "timeline"} if ps is not None else None,
               "timeline": _window(trainer.timeline, warmup)}
    return out


def _window(timeline: list[tuple[str, float, float]], first: int, n: int = 8) -> list[tuple[str, float, float]]:
    """Intervals overlapping ``n`` worker steps from step ``first``, in seconds from the window's start."""
    comp = sorted(iv for iv in timeline if iv[0] == "compute")
    if not comp:
        return []
    a = comp[min(first, len(comp) - 1)][1]
    b = comp[min(first + n, len(comp) - 1)][2]
    return [(st, max(t0, a) - a, min(t1, b) - a) for st, t0, t1 in sorted(timeline, key=lambda x: x[1])
            if t1 > a and t0 < b]


def run_gpu_bench(models: tuple[str, ...] = ("deepfm", "dlrm"), rows: int = 10**8,
                  batch_sizes: tuple[int, ...] = (8192, 65536), steps: int = 40, warmup: int = 10, dim: int = 16,
                  device_fraction: float = 0.10, host_fraction: float = 0.25, lr: float = 0.05,
                  sides: tuple[str, ...] = ("hbm", "device", "cpu"), root: str | Path | None = None,
                  trace_dir: str | Path | None = None, log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run the three sides for each model and batch size; ratios to the ``hbm`` side.

    Args:
        rows: rows of the in-HBM table (the key space of the synthetic data is sized to it).
        device_fraction: device-cache rows as a fraction of ``rows`` (per table).
        host_fraction: host-cache rows as a fraction of ``rows`` (per table).
        sides: which of ``hbm``, ``device``, ``cpu`` to run.
        root: where the stores go (default: a temporary directory).
        trace_dir: write a profiler trace of each device run here.
    """
    unknown = sorted(set(sides) - {"hbm", "device", "cpu"})
    if unknown:
        raise ValueError(f"unknown sides {unknown}; choose from hbm, device, cpu")
    for m in models:
        if m not in ("deepfm", "dlrm"):
            raise ValueError(f"model must be deepfm or dlrm, got {m!r}")
    gpu = cuda_available()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    dev_backend = "cuda" if gpu else "cpu"
    res: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__},
        "rows": rows, "dim": dim, "steps": steps, "warmup": warmup, "device_fraction": device_fraction,
        "host_fraction": host_fraction, "runs": []}
    if not gpu:
        log_fn("no CUDA device: hbm and device sides run on the CPU device (a smoke test, not a GPU measurement)")
    with tempfile.TemporaryDirectory(prefix="damo-gpu-bench-", dir=root) as d:
        for model in models:
            for bs in batch_sizes:
                # 26 fields, vocabularies log-spaced so that together they span about `rows` ids
                data = SyntheticCriteo(bs, seed=0, vocab_min=max(10, rows // 100), vocab_max=max(100, rows // 13))
                run: dict[str, Any] = {"model": model, "batch_size": bs}
                if "hbm" in sides:
                    run["hbm"] = _bench_hbm(model, data, rows, dim, steps, warmup, lr, device)
                if "device" in sides:
                    tr = Path(trace_dir) / f"trace-{model}-{bs}.json" if trace_dir else None
                    run["device"] = _bench_damo(model, data, rows, dim, steps, warmup, lr, dev_backend,
                                                device_fraction, host_fraction, Path(d), tr)
                if "cpu" in sides:
                    run["cpu"] = _bench_damo(model, data, rows, dim, steps, warmup, lr, "cpu", None,
                                             host_fraction, Path(d), None)
                if "hbm" in run:
                    for s in ("device", "cpu"):
                        if s in run:
                            run[f"{s}_vs_hbm"] = run[s]["samples_per_s"] / run["hbm"]["samples_per_s"]
                res["runs"].append(run)
                log_fn(f"{model} batch {bs:,}: " + ", ".join(
                    f"{s} {run[s]['samples_per_s']:,.0f} samples/s" for s in ("hbm", "device", "cpu") if s in run)
                    + "".join(f", {s}/hbm {run[f'{s}_vs_hbm']:.2f}x" for s in ("device", "cpu") if f"{s}_vs_hbm" in run))
    return res
