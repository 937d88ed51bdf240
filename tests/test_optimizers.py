"""Row-wise optimizers against torch.optim on dense rows, and float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from damo_hybrid import InitializerConfig, OptimizerConfig, ScheduleConfig, TableConfig
from damo_hybrid.config import ScheduleKind
from damo_hybrid.rows.optimizers import RowOptimizer, scheduled_lr

N, D, STEPS = 6, 5, 60


def _grads(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((STEPS, N, D)).astype(np.float32)


def _run_store(make_store, opt: OptimizerConfig, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = make_store([TableConfig("t", D, initializer=InitializerConfig.normal(std=0.5), optimizer=opt)])
    keys = np.arange(N, dtype=np.uint64) * np.uint64(2**60)
    w0 = s.lookup("t", keys)
    for g in grads:
        s.apply_gradients("t", keys, g)
    return w0, s.lookup("t", keys)


def _run_torch(w0: np.ndarray, grads: np.ndarray, make) -> np.ndarray:
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    o = make([p])
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        o.step()
    return p.detach().numpy()


@pytest.mark.parametrize(
    "cfg, make",
    [
        (OptimizerConfig.sgd(0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
        (OptimizerConfig.sgd(0.05, weight_decay=0.1), lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.1)),
        (OptimizerConfig.adagrad(0.1, eps=1e-10), lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10)),
        (OptimizerConfig.adagrad(0.1, eps=1e-6, lr_decay=0.01, weight_decay=0.05, initial_accumulator=0.1),
         lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-6, lr_decay=0.01, weight_decay=0.05,
                                       initial_accumulator_value=0.1)),
        (OptimizerConfig.adam(0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
        (OptimizerConfig.adam(0.01, weight_decay=0.1, beta1=0.8, beta2=0.99),
         lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, betas=(0.8, 0.99))),
        (OptimizerConfig.adamw(0.01, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
    ],
    ids=["sgd", "sgd_wd", "adagrad", "adagrad_full", "adam", "adam_l2", "adamw"],
)
def test_matches_torch_optim(make_store, cfg, make):
    grads = _grads()
    w0, ours = _run_store(make_store, cfg, grads)
    ref = _run_torch(w0, grads, make)
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6)


def _ftrl_ref(w, g_all, alpha, beta, l1, l2):
    w = w.astype(np.float64)
    z = np.zeros_like(w)
    n = np.zeros_like(w)
    for g in g_all.astype(np.float64):
        sigma = (np.sqrt(n + g * g) - np.sqrt(n)) / alpha
        z += g - sigma * w
        n += g * g
        w = np.where(np.abs(z) <= l1, 0.0, -(z - np.sign(z) * l1) / ((beta + np.sqrt(n)) / alpha + l2))
    return w


def _lion_ref(w, g_all, lr, b1, b2, wd):
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    for g in g_all.astype(np.float64):
        c = b1 * m + (1 - b1) * g
        w = w - lr * (np.sign(c) + wd * w)
        m = b2 * m + (1 - b2) * g
    return w


def _rowwise_ref(w, g_all, lr, eps):
    w = w.astype(np.float64)
    s = np.zeros((w.shape[0], 1))
    for g in g_all.astype(np.float64):
        s += np.mean(g * g, axis=1, keepdims=True)
        w = w - lr * g / (np.sqrt(s) + eps)
    return w


def test_ftrl_matches_float64_reference(make_store):
    grads = _grads(1)
    w0, ours = _run_store(make_store, OptimizerConfig.ftrl(alpha=0.1, beta=1.0, l1=6.0, l2=0.1), grads)
    # FTRL-proximal's first step overwrites the initial weights from z and n
    ref = _ftrl_ref(w0, grads, 0.1, 1.0, 6.0, 0.1)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert (ours == 0).any() and (ours != 0).any()  # l1 produces real sparsity


def test_lion_matches_float64_reference(make_store):
    grads = _grads(2)
    w0, ours = _run_store(make_store, OptimizerConfig.lion(lr=0.01, weight_decay=0.1), grads)
    np.testing.assert_allclose(ours, _lion_ref(w0, grads, 0.01, 0.9, 0.99, 0.1), rtol=1e-5, atol=1e-6)


def test_rowwise_adagrad_matches_float64_reference(make_store):
    grads = _grads(3)
    w0, ours = _run_store(make_store, OptimizerConfig.rowwise_adagrad(lr=0.1, eps=1e-8), grads)
    np.testing.assert_allclose(ours, _rowwise_ref(w0, grads, 0.1, 1e-8), rtol=1e-5, atol=1e-6)


def test_bias_correction_uses_each_keys_own_count(make_store):
    """A key first updated at global step 50 gets Adam's first-step size, like a fresh parameter."""
    s = make_store([TableConfig("t", D, initializer=InitializerConfig.zeros(), optimizer=OptimizerConfig.adam(0.01))])
    old, new = np.array([1], np.uint64), np.array([2], np.uint64)
    g = np.full((1, D), 3.0, np.float32)
    for _ in range(50):
        s.apply_gradients("t", old, g)
    s.apply_gradients("t", new, g)
    # Adam's first step moves every coordinate by lr * sign(g) (up to eps)
    np.testing.assert_allclose(s.lookup("t", new), -0.01 * np.ones((1, D)), rtol=1e-5)
    assert s.read_rows("t", new)[0].count[0] == 1 and s.read_rows("t", old)[0].count[0] == 50


def test_schedule_uses_the_tables_global_step(make_store):
    sched = ScheduleConfig(kind="exponential", decay_steps=1, decay_rate=0.5)
    s = make_store([TableConfig("t", 1, initializer=InitializerConfig.zeros(), optimizer=OptimizerConfig.sgd(1.0, schedule=sched))])
    k, g = np.array([1], np.uint64), np.ones((1, 1), np.float32)
    for _ in range(3):
        s.apply_gradients("t", k, g)
    np.testing.assert_allclose(s.lookup("t", k), [[-(1 + 0.5 + 0.25)]])
    s.apply_gradients("t", k, g, step=0)  # an explicit step overrides the counter
    np.testing.assert_allclose(s.lookup("t", k), [[-2.75]])


@pytest.mark.parametrize(
    "kind, kw, step, expect",
    [
        ("constant", {}, 7, 0.1),
        ("exponential", dict(decay_steps=10, decay_rate=0.5), 20, 0.025),
        ("exponential", dict(decay_steps=10, decay_rate=0.5, staircase=True), 15, 0.05),
        ("polynomial", dict(decay_steps=10, end_lr=0.0, power=2.0), 5, 0.025),
        ("polynomial", dict(decay_steps=10, end_lr=0.01), 50, 0.01),
        ("natural_exponential", dict(decay_steps=10, decay_rate=1.0), 10, 0.1 * math.exp(-1)),
        ("inverse_time", dict(decay_steps=10, decay_rate=1.0), 10, 0.05),
        ("cosine", dict(decay_steps=10), 5, 0.05),
        ("cosine", dict(decay_steps=10, alpha=0.1), 10, 0.01),
        ("linear_cosine", dict(decay_steps=10, alpha=0.0, beta=0.0, num_periods=0.5), 0, 0.1),
        ("linear_cosine", dict(decay_steps=10, alpha=0.0, beta=0.001, num_periods=0.5), 10, 0.0001),
    ],
)
def test_schedules(kind, kw, step, expect):
    assert scheduled_lr(0.1, ScheduleConfig(kind=ScheduleKind(kind), **kw), step) == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_linear_warmup_composes_with_any_schedule():
    s = ScheduleConfig(kind="cosine", decay_steps=100, warmup_steps=10)
    assert scheduled_lr(1.0, s, 0) == pytest.approx(0.1 * 0.5 * (1 + math.cos(0)))
    assert scheduled_lr(1.0, s, 4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 100)))
    assert scheduled_lr(1.0, s, 50) == pytest.approx(0.5)


def test_optimizer_update_is_vectorized_over_rows():
    """Updating rows together equals updating them one at a time."""
    opt = RowOptimizer(OptimizerConfig.adam(0.01), 3)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    st = np.abs(rng.standard_normal((4, 6))).astype(np.float32)
    g = rng.standard_normal((4, 3)).astype(np.float32)
    cnt = np.array([1, 5, 9, 2])
    w1, st1 = w.copy(), st.copy()
    opt.update(w1, st1, g, cnt, 0.01)
    for i in range(4):
        wi, si = w[i:i + 1].copy(), st[i:i + 1].copy()
        opt.update(wi, si, g[i:i + 1], cnt[i:i + 1], 0.01)
        np.testing.assert_array_equal(wi, w1[i:i + 1])
        np.testing.assert_array_equal(si, st1[i:i + 1])


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(lr=float("nan")), dict(beta1=1.0), dict(eps=-1.0), dict(kind="rmsprop")])
def test_bad_optimizer_config(bad):
    with pytest.raises(ValueError):
        OptimizerConfig(**bad)
