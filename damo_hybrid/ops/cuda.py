"""CUDA twin of :mod:`damo_hybrid.ops.cpu`'s fused optimizer step, on CuPy arrays.

Kernels live in ``damo_hybrid/ops/kernels/*.cu`` (package data, shipped in the wheel; one
file per op, named like the op) and are compiled once per process with CuPy's ``RawModule``
(``--fmad=false``, so float32 arithmetic rounds like numpy's). Importing this module needs
CuPy; :func:`damo_hybrid.ops.resolve_backend` decides whether it is used.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import cupy as cp  # type: ignore[import-not-found]
import numpy as np

from ..config import OptimizerKind
from ..rows.optimizers import RowOptimizer
from . import KERNELS

__all__ = ["optimizer_step", "kernel_dir"]

_BLOCK = 256


def kernel_dir() -> Path:
    """Where the ``.cu`` sources are: ``$DAMO_HYBRID_KERNELS``, else the package's ``ops/kernels/``."""
    env = os.environ.get("DAMO_HYBRID_KERNELS")
    d = Path(env) if env else KERNELS
    if not (d / "optimizer_step.cu").is_file():
        raise FileNotFoundError(f"CUDA kernel sources not found in {d}; reinstall damo-hybrid (the wheel ships "
                                "them) or set DAMO_HYBRID_KERNELS to a folder holding optimizer_step.cu")
    return d


@functools.lru_cache(maxsize=None)
def _kernel(file: str, name: str) -> Any:
    src = (kernel_dir() / file).read_text()
    return cp.RawModule(code=src, options=("--fmad=false", "-std=c++17")).get_function(name)


def _grid(n: int) -> tuple[int]:
    return (max(1, math.ceil(n / _BLOCK)),)


def optimizer_step(opt: RowOptimizer, w: cp.ndarray, state: cp.ndarray, g: cp.ndarray,
                   count: cp.ndarray, lr: float) -> None:
    """In-place twin of :meth:`RowOptimizer.update` on C-contiguous float32 CuPy arrays."""
    n, d = int(w.shape[0]), opt.dim
    if n == 0:
        return
    f = np.float32
    lr32 = f(lr)
    k = opt.kind
    t = count.astype(cp.float64)
    if k is OptimizerKind.SGD:
        _kernel("optimizer_step.cu", "sgd_step")(_grid(n * d), (_BLOCK,), (w, g, np.int64(n), np.int32(d), lr32, opt.wd))
    elif k in (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD):
        clr = (float(lr32) / (1.0 + (t - 1.0) * opt.lr_decay)).astype(cp.float32)
        if k is OptimizerKind.ADAGRAD:
            _kernel("optimizer_step.cu", "adagrad_step")(
                _grid(n * d), (_BLOCK,), (w, state, g, clr, np.int64(n), np.int32(d), opt.wd, opt.eps))
        else:
            _kernel("optimizer_step.cu", "rowwise_adagrad_step")(
                _grid(n), (_BLOCK,), (w, state, g, clr, np.int64(n), np.int32(d), opt.wd, opt.eps))
    elif k in (OptimizerKind.ADAM, OptimizerKind.ADAMW):
        step_size = (float(lr32) / (1.0 - opt.b1 ** t)).astype(cp.float32)
        bc2 = cp.sqrt(1.0 - opt.b2 ** t).astype(cp.float32)
        _kernel("optimizer_step.cu", "adam_step")(
            _grid(n * d), (_BLOCK,),
            (w, state, g, step_size, bc2, np.int64(n), np.int32(d), lr32, opt.wd, f(1.0 - opt.b1), f(opt.b2),
             f(1.0 - opt.b2), opt.eps, np.int32(k is OptimizerKind.ADAMW)))
    elif k is OptimizerKind.FTRL:
        _kernel("optimizer_step.cu", "ftrl_step")(
            _grid(n * d), (_BLOCK,), (w, state, g, np.int64(n), np.int32(d), lr32, opt.ftrl_beta, opt.l1, opt.l2))
    elif k is OptimizerKind.LION:
        _kernel("optimizer_step.cu", "lion_step")(
            _grid(n * d), (_BLOCK,),
            (w, state, g, np.int64(n), np.int32(d), lr32, opt.wd, f(opt.b1), f(1.0 - opt.b1), f(opt.b2), f(1.0 - opt.b2)))
    else:  # pragma: no cover - enum is closed
        raise AssertionError(k)
