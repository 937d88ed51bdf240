"""CUDA twins of :mod:`damo_hybrid.ops.cpu`: the same ops on CuPy arrays.

Kernels live in ``kernels/*.cu`` (one file per op, named like the op) and are compiled once
per process with CuPy's ``RawModule`` (``--fmad=false``, so float32 arithmetic rounds like
numpy's). Importing this module needs CuPy; :func:`damo_hybrid.ops.resolve_backend` decides
whether it is used.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import cupy as cp  # type: ignore[import-not-found]
import numpy as np

from ..config import InitializerKind, OptimizerKind
from ..initializers import _TRUNC_ROUNDS, RowInitializer
from ..optimizers import RowOptimizer

__all__ = ["gather_rows", "scatter_rows", "reduce_by_key", "init_rows", "optimizer_step", "kernel_dir"]

_BLOCK = 256
_INIT_KIND = {
    InitializerKind.UNIFORM: 2,
    InitializerKind.NORMAL: 3,
    InitializerKind.TRUNCATED_NORMAL: 4,
    InitializerKind.XAVIER_UNIFORM: 5,
}


def kernel_dir() -> Path:
    """Where the ``.cu`` sources are: ``$DAMO_HYBRID_KERNELS`` or the checkout's ``kernels/``."""
    env = os.environ.get("DAMO_HYBRID_KERNELS")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "kernels"
    if not (d / "init_rows.cu").is_file():
        raise FileNotFoundError(f"CUDA kernel sources not found in {d}; set DAMO_HYBRID_KERNELS to the kernels/ folder")
    return d


@functools.lru_cache(maxsize=None)
def _kernel(file: str, name: str) -> Any:
    src = (kernel_dir() / file).read_text()
    return cp.RawModule(code=src, options=("--fmad=false", "-std=c++17")).get_function(name)


def _grid(n: int) -> tuple[int]:
    return (max(1, math.ceil(n / _BLOCK)),)


def gather_rows(slab: cp.ndarray, slots: cp.ndarray) -> cp.ndarray:
    """float32 (S, W), int64 (N,) -> float32 (N, W)."""
    return cp.take(slab, slots, axis=0)


def scatter_rows(slab: cp.ndarray, slots: cp.ndarray, rows: cp.ndarray) -> None:
    """``slab[slots] = rows`` in place; slots distinct."""
    slab[slots] = rows


def reduce_by_key(grads: cp.ndarray, inverse: cp.ndarray, n_unique: int) -> cp.ndarray:
    """Bit-equal twin of the CPU op: per-key sums in order of appearance."""
    grads = cp.ascontiguousarray(grads, dtype=cp.float32)
    n, d = grads.shape
    # sort by (key, position): a stable order without relying on a stable sort
    order = cp.argsort(inverse.astype(cp.int64) * n + cp.arange(n, dtype=cp.int64))
    counts = cp.bincount(inverse, minlength=n_unique)
    starts = cp.zeros(n_unique + 1, dtype=cp.int64)
    cp.cumsum(counts, out=starts[1:])
    out = cp.empty((n_unique, d), dtype=cp.float32)
    if n_unique:
        _kernel("reduce_by_key.cu", "reduce_by_key")(
            _grid(n_unique * d), (_BLOCK,),
            (grads, order.astype(cp.int64), starts, np.int64(n_unique), np.int32(d), out))
    return out


def init_rows(init: RowInitializer, keys: cp.ndarray) -> cp.ndarray:
    """uint64 (N,) -> float32 (N, dim), the same rows as the CPU twin."""
    n, d = int(keys.shape[0]), init.dim
    if init.kind is InitializerKind.ZEROS:
        return cp.zeros((n, d), dtype=cp.float32)
    if init.kind is InitializerKind.ONES:
        return cp.ones((n, d), dtype=cp.float32)
    kind = _INIT_KIND[init.kind]
    if init.kind is InitializerKind.UNIFORM:
        a, b = init.low, init.high
    elif init.kind is InitializerKind.XAVIER_UNIFORM:
        a, b = 0.0, math.sqrt(6.0 / (1.0 + d))
    else:
        a, b = init.mean, init.std
    out = cp.empty((n, d), dtype=cp.float32)
    if n:
        _kernel("init_rows.cu", "init_rows")(
            _grid(n * d), (_BLOCK,),
            (cp.ascontiguousarray(keys, dtype=cp.uint64), np.int64(n), np.int32(d), np.uint64(init._salt),
             np.int32(kind), np.float64(a), np.float64(b), np.int32(_TRUNC_ROUNDS), out))
    return out


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
