"""Communication of tables sharded over ranks: ``damo-hybrid bench --dist``.

``world`` local ranks (gloo on loopback) train DeepFM (26 fields, dim 16, Adagrad) with the
Trainer's pipeline, each on its ``1 / world`` of every global synthetic batch, behind a host
cache per rank. After ``warmup`` steps every rank counts, per step, the bytes it sends to other
ranks (keys to their owners; rows back; gradients to the owners) and the seconds in those
all-to-alls (means over every step), and the median step time after ``warmup`` steps. On one machine the ranks share its cores, so the samples/s are
not a scaling measurement: the scaling model (:func:`scaling_model`) is.
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from . import RankFailed, machine

__all__ = ["run_dist_bench", "scaling_model", "unique_per_rank"]


def _last_error(trace: str) -> str:
    """The final exception of a rank's traceback text, ``Type: message`` on one line (the
    package path of its type left out), at most 200 characters."""
    found = "an error (its traceback holds no exception line)"
    for line in trace.splitlines():
        m = re.match(r"([A-Za-z_][\w.]*)(: .*)?$", line)  # frames are indented; this is not
        if m and (m.group(2) or m.group(1).endswith(("Error", "Exception", "Interrupt", "Exit"))):
            found = m.group(1).rsplit(".", 1)[-1] + (m.group(2) or "")
    return found if len(found) <= 200 else found[:199] + "…"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, root: str, batch: int, steps: int, warmup: int, cache_mb: float) -> None:
    import torch
    import torch.distributed as dist

    from ..config import InitializerConfig, OptimizerConfig
    from ..data.synthetic import SyntheticCriteo
    from ..nn.models import DeepFM, model_tables
    from ..pipeline.trainer import Trainer
    from ..store import EmbeddingStore

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        torch.set_num_threads(1)
        data = SyntheticCriteo(batch, seed=0)
        part = slice(rank * batch // world, (rank + 1) * batch // world)

        def local(i: int) -> Any:
            b = data.batch(i)
            return type(b)({f: k[part] for f, k in b.sparse.items()}, b.dense[part], b.label[part])

        tables = model_tables("deepfm", 16, OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.01))
        with EmbeddingStore(Path(root) / f"rank{rank}", tables) as store:
            torch.manual_seed(0)
            model = DeepFM(store, data.sparse_fields, len(data.dense_fields), cache_mb=cache_mb, backend="cpu")
            trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), local)
            ex = model.sparse
            marks: list[float] = []

            def progress(step: int, loss: float) -> None:
                if step >= warmup:
                    marks.append(time.perf_counter())

            trainer.fit(warmup + steps, progress=progress, prefetch=True)
            # exchange figures: means over every step (the host manager prepares ahead of the
            # worker, so a window's counts would cut its exchanges at another step than the worker's)
            total = ex.exchange_stats()
            per = {g: {k: v / (warmup + steps) for k, v in total[g].items()} for g in total}
            times = [b - a for a, b in zip(marks, marks[1:])]
            out = {"rank": rank, "steps": len(times), "step_ms_median": 1000 * statistics.median(times),
                   "samples_per_s": (batch // world) / statistics.median(times),
                   "keys_bytes_per_step": per["prepare"]["bytes_sent"],
                   "rows_and_grads_bytes_per_step": per["step"]["bytes_sent"],
                   "keys_ms_per_step": 1000 * per["prepare"]["seconds"],
                   "rows_and_grads_ms_per_step": 1000 * per["step"]["seconds"],
                   "unique_keys_per_step": per["prepare"]["bytes_sent"] / 8 * world / max(world - 1, 1),
                   "dense_bytes": 4 * sum(p.numel() for p in model.parameters())}
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def scaling_model(unique_per_rank: float, row_bytes: int, batch: int, gbps: float, host_keys_per_s: float,
                  compute_ms: float, ranks: int, dense_bytes: int = 0) -> dict[str, float]:
    """Samples/s of ``ranks`` machines on a global batch ``batch`` (a model, not a measurement).

    Per rank and step: ``u = unique_per_rank`` distinct keys (of its ``batch / ranks`` samples,
    per table, summed over tables); ``(R - 1) / R`` of them live elsewhere, and for each the rank
    sends 8 bytes of key and ``row_bytes`` of gradient and receives ``row_bytes`` of row, so it
    sends ``u (R - 1) / R (8 + row_bytes)`` bytes each way, plus a ring all-reduce of the dense
    gradients, ``2 (R - 1) / R dense_bytes``: ``net`` bytes over ``gbps``; its host manager
    makes ``u`` keys resident at ``host_keys_per_s``; its worker computes ``batch / R`` samples in
    ``compute_ms / R`` (``compute_ms``: the whole batch on one rank). The pipeline overlaps the three, so
    ``step = max(net / bandwidth, u / host_keys_per_s, compute_ms / R)`` and
    ``samples/s = batch / step``.
    """
    net = unique_per_rank * (ranks - 1) / ranks * (8 + row_bytes) + 2 * (ranks - 1) / ranks * dense_bytes
    net_s = net / (gbps * 1e9 / 8)
    host_s = unique_per_rank / host_keys_per_s
    compute_s = compute_ms / 1000 / ranks
    step = max(net_s, host_s, compute_s)
    return {"ranks": ranks, "gbps": gbps, "unique_per_rank": unique_per_rank, "net_ms": 1000 * net_s,
            "host_ms": 1000 * host_s, "compute_ms": 1000 * compute_s, "samples_per_s": batch / step,
            "bound": ("network", "host", "compute")[int(np.argmax([net_s, host_s, compute_s]))]}


def unique_per_rank(batch: int, ranks: int, batches: int = 4) -> float:
    """Mean distinct keys of one rank's ``batch / ranks`` samples of the synthetic data (26 fields
    in one table), measured on the generator."""
    from ..data.synthetic import SyntheticCriteo

    data = SyntheticCriteo(batch, seed=0)
    n = []
    for i in range(batches):
        b = data.batch(i)
        keys = np.concatenate([k[: batch // ranks] for k in b.sparse.values()])
        n.append(len(np.unique(keys)))
    return float(np.mean(n))


def run_dist_bench(world: int = 2, batch: int = 4096, steps: int = 30, warmup: int = 10,
                   cache_mb: float = 64.0) -> dict[str, Any]:
    """Train on ``world`` local ranks and report each rank's communication per step (module doc)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        try:
            mp.start_processes(_rank, args=(world, _free_port(), d, batch, steps, warmup, cache_mb), nprocs=world,
                               start_method="spawn")
        except mp.ProcessExitedException as e:
            how = (f"was stopped by {e.signal_name}" if e.signal_name else
                   f"ended with exit status {e.exit_code} without an error of its own (killed, or out of memory?)")
            raise RankFailed(f"rank {e.error_index} of {world} {how}; nothing was measured", died=True) from None
        except mp.ProcessRaisedException as e:
            raise RankFailed(f"rank {e.error_index} of {world} failed: {_last_error(e.msg)}; nothing was measured",
                             died=False) from None
        ranks = [json.loads((Path(d) / f"rank{r}.json").read_text()) for r in range(world)]
    return {"machine": machine(), "world": world, "batch": batch, "steps": steps, "warmup": warmup,
            "cache_mb": cache_mb, "ranks": ranks, "model": "deepfm", "dim": 16,
            "bytes_per_key": 8, "bytes_per_row": 4 * 17}
