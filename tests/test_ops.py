"""The hot ops: CPU implementations against plain references, CUDA twins against the CPU ones."""

from __future__ import annotations

import numpy as np
import pytest

from damo_hybrid import OptimizerConfig
from damo_hybrid.ops import Backend, cuda_available, get_ops, resolve_backend
from damo_hybrid.ops import cpu as cpu_ops
from damo_hybrid.rows.optimizers import RowOptimizer, state_width

OPTIMIZERS = [
    OptimizerConfig.sgd(0.05),
    OptimizerConfig.sgd(0.05, weight_decay=0.1),
    OptimizerConfig.adagrad(0.1, lr_decay=0.01, weight_decay=0.02, initial_accumulator=0.1),
    OptimizerConfig.rowwise_adagrad(0.1, eps=1e-6),
    OptimizerConfig.adam(0.01, weight_decay=0.1),
    OptimizerConfig.adamw(0.01, weight_decay=0.1),
    OptimizerConfig.ftrl(alpha=0.1, beta=1.0, l1=0.5, l2=0.1),
    OptimizerConfig.lion(0.01, weight_decay=0.1),
]


def test_backend_resolution_is_explicit():
    assert resolve_backend("cpu") is Backend.CPU
    assert resolve_backend("auto") is (Backend.CUDA if cuda_available() else Backend.CPU)
    assert get_ops("cpu") is cpu_ops
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'cuda'"):
        resolve_backend("tpu")
    if not cuda_available():
        with pytest.raises(ValueError, match="CUDA is unavailable"):
            resolve_backend("cuda")


def test_reduce_by_key_sums_in_order_of_appearance():
    rng = np.random.default_rng(0)
    inv = rng.integers(0, 50, 1000)
    g = rng.standard_normal((1000, 7)).astype(np.float32)
    out = cpu_ops.reduce_by_key(g, inv, 50)
    ref = np.zeros((50, 7), np.float32)
    for i, u in enumerate(inv):  # the plain sequential definition
        ref[u] = ref[u] + g[i]
    np.testing.assert_array_equal(out, ref)


# ------------------------------------------------------------------ CUDA twins
def _random_rows(opt: RowOptimizer, n: int, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, opt.dim)).astype(np.float32)
    s = np.abs(rng.standard_normal((n, opt.width))).astype(np.float32)
    g = rng.standard_normal((n, opt.dim)).astype(np.float32)
    count = rng.integers(1, 50, n)
    return w, s, g, count


@pytest.mark.requires_cuda
@pytest.mark.parametrize("cfg", OPTIMIZERS, ids=lambda c: f"{c.kind.value}-wd{c.weight_decay}")
@pytest.mark.parametrize("dim", [1, 16, 67])
def test_cuda_optimizer_step_matches_cpu(cfg, dim):
    import cupy as cp

    cuda = get_ops("cuda")
    opt = RowOptimizer(cfg, dim)
    w, s, g, count = _random_rows(opt, 3000, dim)
    w_c, s_c = w.copy(), s.copy()
    cpu_ops.optimizer_step(opt, w_c, s_c, g, count, 0.05)
    w_g, s_g = cp.asarray(w), cp.asarray(s)
    cuda.optimizer_step(opt, w_g, s_g, cp.asarray(g), cp.asarray(count), 0.05)
    w_g, s_g = cp.asnumpy(w_g), cp.asnumpy(s_g)
    if cfg.kind.value in ("sgd", "lion"):
        np.testing.assert_array_equal(w_g, w_c)  # no transcendental, no reduction: bit-equal
    np.testing.assert_allclose(w_g, w_c, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(s_g, s_c, rtol=2e-6, atol=1e-7)
    assert s_g.shape == (3000, state_width(cfg.kind, dim))
