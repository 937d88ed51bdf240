"""EmbeddingCollection against a plain in-memory torch model holding the same rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.nn import EmbeddingCollection, Feature

V, D, B = 200, 4, 32


def _store(path, opt):
    return EmbeddingStore(path, [TableConfig("a", D, initializer=InitializerConfig.normal(std=0.3, seed=1), optimizer=opt),
                                 TableConfig("b", D, initializer=InitializerConfig.uniform(-0.2, 0.2), optimizer=opt)])


def _batches(seed=0, n=30):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        x1 = rng.integers(0, V, B).astype(np.uint64)
        x2 = rng.integers(0, V, B).astype(np.uint64)
        lens = rng.integers(0, 3, B)
        offs = np.concatenate([[0], np.cumsum(lens)])
        bag = rng.integers(0, V, offs[-1]).astype(np.uint64)
        y = rng.random(B).astype(np.float32)
        yield x1, x2, bag, offs, y


@pytest.mark.parametrize("opt, torch_opt", [
    (OptimizerConfig.sgd(0.5), lambda p: torch.optim.SGD(p, lr=0.5)),
    (OptimizerConfig.adagrad(0.3), lambda p: torch.optim.Adagrad(p, lr=0.3, eps=1e-10)),
], ids=["sgd", "adagrad"])
def test_training_matches_in_memory_embeddings(tmp_path, opt, torch_opt):
    """Same rows, same data, same optimizer: disk-backed and in-memory weights agree.

    Rows a batch does not touch get no update in either (torch's sparse-style check: a
    dense optimizer would still touch them with zero gradients, so we compare with one
    optimizer per row that steps only touched rows)."""
    with _store(tmp_path / "s", opt) as store:
        emb = EmbeddingCollection(store, [Feature("x1", "a"), Feature("x2", "b"), Feature("bag", "a", pooling="mean")], backend="cpu",
                                  cache_mb=0.001, min_cache_rows=120)  # smaller than the vocab: evictions happen
        head = torch.nn.Linear(3 * D, 1)
        ref_head = torch.nn.Linear(3 * D, 1)
        ref_head.load_state_dict(head.state_dict())
        keys = np.arange(V, dtype=np.uint64)
        ref = {t: torch.nn.Parameter(torch.from_numpy(store.lookup(t, keys).copy())) for t in ("a", "b")}
        ref_opt = {t: [torch_opt([torch.nn.Parameter(ref[t].data[i].clone())]) for i in range(V)] for t in ("a", "b")}
        rows = {t: [o.param_groups[0]["params"][0] for o in ref_opt[t]] for t in ("a", "b")}
        dense = torch.optim.SGD(head.parameters(), lr=0.1)
        ref_dense = torch.optim.SGD(ref_head.parameters(), lr=0.1)
        for x1, x2, bag, offs, y in _batches():
            out = emb({"x1": x1, "x2": x2, "bag": (bag, offs)})
            loss = ((head(torch.cat([out["x1"], out["x2"], out["bag"]], 1)).squeeze(1) - torch.from_numpy(y)) ** 2).mean()
            dense.zero_grad()
            loss.backward()
            emb.apply_gradients()
            dense.step()

            wa = torch.stack(rows["a"])
            wb = torch.stack(rows["b"])
            wa.retain_grad()
            wb.retain_grad()
            i1, i2 = torch.from_numpy(x1.astype(np.int64)), torch.from_numpy(x2.astype(np.int64))
            pooled = torch.nn.functional.embedding_bag(torch.from_numpy(bag.astype(np.int64)), wa,
                                                       torch.from_numpy(offs[:-1]), mode="mean")
            ref_loss = ((ref_head(torch.cat([wa[i1], wb[i2], pooled], 1)).squeeze(1) - torch.from_numpy(y)) ** 2).mean()
            ref_dense.zero_grad()
            ref_loss.backward()
            ref_dense.step()
            for t, w in (("a", wa), ("b", wb)):
                touched = torch.nonzero(w.grad.abs().sum(1) > 0).flatten().tolist()
                for i in touched:
                    rows[t][i].grad = w.grad[i].clone()
                    ref_opt[t][i].step()
        emb.flush()
        for t in ("a", "b"):
            np.testing.assert_allclose(store.lookup(t, keys), torch.stack(rows[t]).detach().numpy(), rtol=1e-5, atol=1e-6)
        assert sum(s.evictions for s in emb.cache_stats().values()) > 0


def test_forgetting_apply_gradients_is_an_error(tmp_path):
    with _store(tmp_path / "s", OptimizerConfig.sgd(0.1)) as store:
        emb = EmbeddingCollection(store, [Feature("x1", "a")], cache_mb=1, backend="cpu")
        x = np.arange(4, dtype=np.uint64)
        emb({"x1": x}).get("x1").sum().backward()
        with pytest.raises(RuntimeError, match="not applied"):
            emb({"x1": x})
        emb.apply_gradients()
        with pytest.raises(RuntimeError, match="no batch to apply"):
            emb.apply_gradients()


def test_bad_inputs(tmp_path):
    with _store(tmp_path / "s", OptimizerConfig.sgd(0.1)) as store:
        emb = EmbeddingCollection(store, [Feature("x1", "a"), Feature("bag", "b", pooling="sum")], cache_mb=1, backend="cpu")
        x = np.arange(4, dtype=np.uint64)
        with pytest.raises(KeyError, match="bag"):
            emb.prepare({"x1": x})
        with pytest.raises(ValueError, match="offsets"):
            emb.prepare({"x1": x, "bag": (x, np.array([0, 2, 3]))})
        with pytest.raises(ValueError, match="batch size"):
            emb.prepare({"x1": x, "bag": (x, np.array([0, 4]))})
        with pytest.raises(TypeError, match="uint64"):
            emb.prepare({"x1": x.astype(np.float32), "bag": (x, np.array([0, 1, 2, 3, 4]))})
        with pytest.raises(ValueError, match="pooling"):
            Feature("f", "a", pooling="max")
        # nothing stays pinned after a failed prepare
        assert all((c.pins == 0).all() for c in emb.caches.values())
