"""Hot ops: CUDA kernels against their CPU twins, side by side in one process.

    python benchmarks/ops_bench.py --rows 1048576 --dim 64

Needs CuPy and a CUDA device. GPU times use CUDA events around each call (kernel time, data
already on the device); CPU times are wall time of the numpy twin. Medians of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from damo_hybrid import OptimizerConfig
from damo_hybrid.ops import cpu as cpu_ops
from damo_hybrid.ops import get_ops
from damo_hybrid.rows.optimizers import RowOptimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    import cupy as cp

    cuda = get_ops("cuda")
    n, d = a.rows, a.dim
    rng = np.random.default_rng(0)

    def gpu_time(fn) -> float:
        fn()
        ts = []
        for _ in range(a.repeats):
            s, e = cp.cuda.Event(), cp.cuda.Event()
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(cp.cuda.get_elapsed_time(s, e) / 1e3)
        return statistics.median(ts)

    def cpu_time(fn) -> float:
        ts = []
        for _ in range(max(3, a.repeats // 3)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    print(f"{n:,} rows x dim {d}; rows/s, median of {a.repeats} (GPU) / {max(3, a.repeats // 3)} (CPU)")
    print(f"{'op':34s} {'CPU twin':>14s} {'CUDA':>16s} {'speed-up':>9s}")

    def report(name: str, c: float, g: float) -> None:
        print(f"{name:34s} {n / c:14,.0f} {n / g:16,.0f} {c / g:8.0f}x")

    g = rng.standard_normal((n, d)).astype(np.float32)
    g_g = cp.asarray(g)
    for cfg in (OptimizerConfig.sgd(0.01), OptimizerConfig.adagrad(0.01), OptimizerConfig.rowwise_adagrad(0.01),
                OptimizerConfig.adam(0.001), OptimizerConfig.ftrl(), OptimizerConfig.lion()):
        opt = RowOptimizer(cfg, d)
        w = rng.standard_normal((n, d)).astype(np.float32)
        s = np.abs(rng.standard_normal((n, opt.width))).astype(np.float32)
        cnt = rng.integers(1, 100, n)
        w_g, s_g, c_g = cp.asarray(w), cp.asarray(s), cp.asarray(cnt)
        report(f"optimizer_step {cfg.kind.value}",
               cpu_time(lambda o=opt, w=w, s=s, c=cnt: cpu_ops.optimizer_step(o, w, s, g, c, 0.01)),
               gpu_time(lambda o=opt, w=w_g, s=s_g, c=c_g: cuda.optimizer_step(o, w, s, g_g, c, 0.01)))

if __name__ == "__main__":
    main()
