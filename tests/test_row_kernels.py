"""The compiled sparse step (``rows.kernels``) and gather backward against their numpy and torch references, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid.config import OptimizerConfig, OptimizerKind
from damo_hybrid.nn.gather import _split_add, split_gather
from damo_hybrid.rows.kernels import BAD_GRADIENT, BAD_RESULT, OK, RowStep, gather_rows, scatter_step
from damo_hybrid.rows.optimizers import RowOptimizer


def _configs():
    yield OptimizerConfig.sgd(0.1)
    yield OptimizerConfig.sgd(0.1, weight_decay=0.01)
    yield OptimizerConfig.adagrad(0.05)
    yield OptimizerConfig.adagrad(0.05, weight_decay=0.01, lr_decay=0.01, initial_accumulator=0.1)
    yield OptimizerConfig.rowwise_adagrad(0.05)
    yield OptimizerConfig.rowwise_adagrad(0.05, weight_decay=0.01, lr_decay=0.01)
    yield OptimizerConfig.adam(0.01)
    yield OptimizerConfig.adam(0.01, weight_decay=0.01)
    yield OptimizerConfig.adamw(0.01, weight_decay=0.05)
    yield OptimizerConfig.ftrl(alpha=0.05, beta=1.0, l1=0.001, l2=0.01)
    yield OptimizerConfig.lion(3e-3, weight_decay=0.01)


def _slab(rng, opt, capacity):
    w = (rng.standard_normal((capacity, opt.dim)) * 0.1).astype(np.float32)
    st = np.abs(rng.standard_normal((capacity, opt.width))).astype(np.float32) * 0.1
    if opt.kind is OptimizerKind.FTRL:
        st[:, :opt.dim] = (rng.standard_normal((capacity, opt.dim)) * 0.01).astype(np.float32)  # z may be negative
    return w, st, rng.integers(0, 100, capacity).astype(np.int64)


@pytest.mark.parametrize("cfg", list(_configs()), ids=lambda c: f"{c.kind.value}-wd{c.weight_decay}")
@pytest.mark.parametrize("dim", [1, 7, 17, 130])
def test_compiled_step_equals_the_numpy_rule_bit_for_bit(cfg, dim):
    rng = np.random.default_rng(dim)
    opt = RowOptimizer(cfg, dim)
    w_slab, st_slab, cnt_slab = _slab(rng, opt, 500)
    slots = rng.permutation(500)[:200].astype(np.int64)
    g = rng.standard_normal((200, dim)).astype(np.float32)
    w, st, cnt = w_slab[slots].copy(), st_slab[slots].copy(), cnt_slab[slots] + 1
    opt.update(w, st, g, cnt, 0.037)  # the reference
    before = (w_slab.copy(), st_slab.copy(), cnt_slab.copy())
    w2, st2, cnt2, status = RowStep(opt).stage(w_slab, st_slab, cnt_slab, slots, g, 0.037)
    assert status == OK
    np.testing.assert_array_equal(w2.view(np.uint32), w.view(np.uint32))
    np.testing.assert_array_equal(st2.view(np.uint32), st.view(np.uint32))
    np.testing.assert_array_equal(cnt2, cnt)
    for a, b in zip((w_slab, st_slab, cnt_slab), before):  # staging changes nothing
        np.testing.assert_array_equal(a, b)


def test_a_nonfinite_gradient_or_result_is_reported_not_resolved():
    opt = RowOptimizer(OptimizerConfig.sgd(1.0), 4)
    w_slab = np.zeros((8, 4), np.float32)
    w_slab[3] = 3e38
    st_slab, cnt_slab = np.zeros((8, 0), np.float32), np.zeros(8, np.int64)
    k = RowStep(opt)
    g = np.ones((2, 4), np.float32)
    assert k.stage(w_slab, st_slab, cnt_slab, np.array([0, 1]), g, 0.1)[3] == OK
    g[1, 2] = np.nan
    assert k.stage(w_slab, st_slab, cnt_slab, np.array([0, 1]), g, 0.1)[3] == BAD_GRADIENT
    g = np.full((2, 4), -3e38, np.float32)  # finite, but 3e38 + 3e38 overflows
    assert k.stage(w_slab, st_slab, cnt_slab, np.array([0, 3]), g, 1.0)[3] == BAD_RESULT


def test_scatter_and_gather_move_exactly_the_given_rows():
    rng = np.random.default_rng(0)
    w_slab = rng.standard_normal((50, 5)).astype(np.float32)
    st_slab = rng.standard_normal((50, 3)).astype(np.float32)
    cnt, upd, dirty = np.zeros(50, np.int64), np.zeros(50, np.int64), np.zeros(50, bool)
    slots = np.array([7, 2, 40], np.int64)
    np.testing.assert_array_equal(gather_rows(w_slab, slots), w_slab[slots])
    want_w, want_st = w_slab.copy(), st_slab.copy()
    w, st = np.ones((3, 5), np.float32), np.full((3, 3), 2, np.float32)
    want_w[slots], want_st[slots] = w, st
    scatter_step(w_slab, st_slab, cnt, upd, dirty, slots, w, st, np.array([1, 2, 3]), 99)
    np.testing.assert_array_equal(w_slab, want_w)
    np.testing.assert_array_equal(st_slab, want_st)
    assert cnt[slots].tolist() == [1, 2, 3] and (upd[slots] == 99).all() and dirty.sum() == 3 and dirty[slots].all()


def test_split_gather_backward_equals_index_add():
    g = torch.Generator().manual_seed(0)
    leaf = torch.randn(300, 9, generator=g, requires_grad=True)
    idx = torch.randint(0, 300, (4000,), generator=g)
    g_emb, g_lin = torch.randn(4000, 8, generator=g), torch.randn(4000, generator=g)
    want = torch.zeros(300, 9)
    want[:, :8].index_add_(0, idx, g_emb)
    want[:, 8].index_add_(0, idx, g_lin)
    got = torch.zeros(300, 9)
    _split_add(got.numpy(), idx.numpy(), g_emb.numpy(), g_lin.numpy())
    assert torch.equal(got, want)
    e, w = split_gather(leaf, idx, 8)  # and through autograd
    (e * g_emb).sum().add_((w * g_lin).sum()).backward()
    assert torch.equal(leaf.grad, want)
