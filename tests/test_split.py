"""The worker's dense part in two halves on two threads (damo_hybrid.pipeline.split): the same
training as one backward up to the order of float additions, repeatable bit for bit, and the
pipelined run still equals the sequential one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig
from damo_hybrid.data.synthetic import SyntheticCriteo
from damo_hybrid.nn.models import MODELS, model_tables
from damo_hybrid.pipeline.split import MIN_SPLIT, dense_parts
from damo_hybrid.pipeline.stages import worker_threads
from damo_hybrid.trainer import Trainer


def _train(path, name, split, prefetch=True, batch=512, steps=10, rows=2200):
    """``steps`` steps of a built-in model with a cache small enough to evict; returns its dense
    state, every stored row (key-ordered) and the trainer."""
    torch.manual_seed(0)
    data = SyntheticCriteo(batch, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
    tables = model_tables(name, 8, OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.1, seed=3))
    with EmbeddingStore(path, tables) as store:
        model = MODELS[name](store, data.sparse_fields, 3, hidden=(32, 16), cache_mb=1e-9, min_cache_rows=rows,
                             backend="cpu")
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), data.batch, split=split)
        trainer.fit(steps, prefetch=prefetch)
        assert sum(c.stats.evictions for c in model.sparse.caches.values()) > 0, "the test must evict"
        keys = np.concatenate([k for k, _ in store.scan("emb")])
        rows = store.read_rows("emb", keys)[0]
        return {n: p.detach().clone() for n, p in model.state_dict().items()}, keys, rows, trainer


@pytest.mark.parametrize("name, dense_mode", [(n, "raw") for n in MODELS] + [("deepfm", "autodis")],
                         ids=[*MODELS, "deepfm-autodis"])
def test_the_split_gives_the_gradients_of_one_backward(tmp_path, name, dense_mode):
    """Every dense parameter's gradient and the rows' (the batch's leaf of unique rows), from the
    two halves, equal one backward of the whole batch's mean loss up to float rounding."""
    from damo_hybrid.pipeline.split import SplitDense

    torch.manual_seed(0)
    data = SyntheticCriteo(512, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
    tables = model_tables(name, 8, OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.1, seed=3))
    b = data.batch(0)
    dense, label = torch.from_numpy(b.dense), torch.from_numpy(b.label)
    with EmbeddingStore(tmp_path / "s", tables) as store:
        sizes = {"top": (32, 16)} if name == "dlrm" else {"hidden": (32, 16)}
        model = MODELS[name](store, data.sparse_fields, 3, backend="cpu", dense_mode=dense_mode, **sizes)
        grads = []
        for split in (False, True):
            model.zero_grad(set_to_none=True)
            prepared = model.prepare(b.sparse)
            if split:
                loss = SplitDense(model).forward_backward(prepared, dense, label)
            else:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(prepared, dense), label)
                loss.backward()
            g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            g["rows"] = prepared.tables["emb"].leaf.grad.clone()
            grads.append((float(loss.detach()), g))
            model.sparse.release(prepared)
    (l1, whole), (l2, halves) = grads
    assert l2 == pytest.approx(l1, rel=1e-6)
    assert whole.keys() == halves.keys() and len(whole) > 2
    for n, g in whole.items():
        np.testing.assert_allclose(halves[n].numpy(), g.numpy(), rtol=1e-4, atol=1e-8, err_msg=n)


def test_a_split_run_repeats_bit_for_bit_and_the_pipeline_equals_the_sequential_loop(tmp_path):
    a, ka, ra, _ = _train(tmp_path / "a", "deepfm", split=True, prefetch=True)
    b, kb, rb, _ = _train(tmp_path / "b", "deepfm", split=True, prefetch=True)
    c, kc, rc, _ = _train(tmp_path / "c", "deepfm", split=True, prefetch=False)
    for other, keys, rows in ((b, kb, rb), (c, kc, rc)):
        np.testing.assert_array_equal(keys, ka)
        np.testing.assert_array_equal(rows.weights, ra.weights)
        np.testing.assert_array_equal(rows.state, ra.state)
        for n, p in a.items():
            np.testing.assert_array_equal(other[n].numpy(), p.numpy(), err_msg=n)


def test_a_batch_under_the_minimum_runs_whole(tmp_path):
    small = MIN_SPLIT // 2
    whole, _, r1, _ = _train(tmp_path / "whole", "deepfm", split=False, batch=small, rows=700)
    split, _, r2, _ = _train(tmp_path / "split", "deepfm", split=True, batch=small, rows=700)
    np.testing.assert_array_equal(r2.weights, r1.weights)
    for n, p in whole.items():
        np.testing.assert_array_equal(split[n].numpy(), p.numpy(), err_msg=n)


def test_the_split_is_chosen_for_two_cores_and_refused_where_it_cannot_apply(tmp_path, monkeypatch):
    import damo_hybrid.pipeline.split as split_mod
    from damo_hybrid.nn.models import DeepFM

    assert dense_parts(2) == 2 and dense_parts(1) == dense_parts(4) == dense_parts(16) == 1
    # two halves share the pipeline's one torch thread on 2 cores; the sequential loop's two
    assert worker_threads(2, prefetch=True, parts=2) == 1 and worker_threads(2, prefetch=False, parts=2) == 1
    assert worker_threads(8, prefetch=True) == 7

    class Custom(torch.nn.Module):  # a model of the user's own: no separable dense part
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

    class Biased(DeepFM):  # its own forward: the split would skip what it adds
        def forward(self, batch, dense):  # type: ignore[no-untyped-def]
            return super().forward(batch, dense) + 1.0

    class Wider(DeepFM):  # only its row-wise dense part: split on request
        def dense_part(self, e, first, dense, dense_in):  # type: ignore[no-untyped-def]
            return 2.0 * super().dense_part(e, first, dense, dense_in)

    data = SyntheticCriteo(8, seed=1, n_sparse=2, n_dense=3)
    with pytest.raises(ValueError, match="split=True needs a built-in model"):
        Trainer(Custom(), torch.optim.SGD(Custom().parameters(), lr=0.1), data.batch, split=True)
    assert Trainer(Custom(), torch.optim.SGD(Custom().parameters(), lr=0.1), data.batch).split is None
    tables = model_tables("deepfm", 4, OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.1))
    threads = torch.get_num_threads()
    monkeypatch.setattr(split_mod.os, "cpu_count", lambda: 2)
    try:
        with EmbeddingStore(tmp_path / "s", tables) as store:
            def trainer(cls, **kw):  # type: ignore[no-untyped-def]
                m = cls(store, data.sparse_fields, 3, hidden=(4,), backend="cpu")
                return Trainer(m, torch.optim.SGD(m.parameters(), lr=0.1), data.batch, **kw)

            with pytest.raises(ValueError, match="split=True needs a built-in model"):
                trainer(Biased, split=True)
            torch.set_num_threads(1)
            assert trainer(DeepFM).split is not None  # 2 cores, one torch thread: split by default
            assert trainer(Biased).split is None and trainer(Wider).split is None  # subclasses: not by default
            assert trainer(Wider, split=True).split is not None
            torch.set_num_threads(2)
            assert trainer(DeepFM).split is None  # an OpenMP team per half would spin on 2 cores
    finally:
        torch.set_num_threads(threads)
