"""Admission through the cache tiers and the trainer: equal to the bare store's, pipelined or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import (
    AdmissionConfig,
    EmbeddingStore,
    InitializerConfig,
    OptimizerConfig,
    StoreConfig,
    TableConfig,
)
from damo_hybrid.nn import EmbeddingCollection, Feature


def _table(unadmitted="init"):
    return TableConfig("t", 4, initializer=InitializerConfig.normal(std=0.1), optimizer=OptimizerConfig.sgd(0.1),
                       admission=AdmissionConfig(min_count=3, capacity=10_000, unadmitted_value=unadmitted))


def _batches(n=12, b=64, vocab=600, seed=0):
    rng = np.random.default_rng(seed)
    return [{"f": rng.integers(0, vocab, b).astype(np.uint64), "g": rng.integers(0, vocab, b).astype(np.uint64)}
            for _ in range(n)]


@pytest.mark.parametrize("device_tier", [False, True])
def test_training_through_the_cache_equals_the_bare_store(tmp_path, device_tier, unadmitted="init"):
    """Loss 0.5 * sum(out^2): each occurrence's gradient is its row; a small cache evicts."""
    batches = _batches()
    cfg = StoreConfig(min_cache_rows=40, device_cache_mb=None)
    with EmbeddingStore(tmp_path / "c", [_table(unadmitted)], cfg) as cached, \
            EmbeddingStore(tmp_path / "r", [_table(unadmitted)]) as ref:
        coll = EmbeddingCollection(cached, [Feature("f", "t"), Feature("g", "t")], cache_mb=0.001, min_cache_rows=140,
                                   backend="cpu", device_cache_mb=0.001 if device_tier else None)
        for b in batches:
            out = coll(b)
            (0.5 * sum((v * v).sum() for v in out.values())).backward()
            coll.apply_gradients()
            keys = np.concatenate([b["f"], b["g"]])
            want = ref.lookup("t", keys)
            np.testing.assert_array_equal(torch.cat([out["f"], out["g"]]).detach().numpy(), want)
            ref.apply_gradients("t", keys, want)
        assert sum(c.stats.evictions for c in coll.caches.values()) > 0
        allk = np.arange(600, dtype=np.uint64)
        np.testing.assert_array_equal(cached.lookup("t", allk), ref.lookup("t", allk))
        a, b = cached.stats(), ref.stats()
        assert a.dropped_unadmitted == b.dropped_unadmitted > 0
        assert 0 < cached.count_rows("t") == ref.count_rows("t") < 600


def test_with_zeros_a_key_reads_zeros_until_the_batch_that_admits_it(tmp_path):
    with EmbeddingStore(tmp_path / "s", [_table("zeros")]) as st:
        coll = EmbeddingCollection(st, [Feature("f", "t")], backend="cpu")
        init = st.table("t").init(np.array([5], np.uint64))[0]
        for seen, want in ((1, np.zeros(4, np.float32)), (2, np.zeros(4, np.float32)), (3, init)):
            out = coll({"f": np.array([5], np.uint64)})["f"]
            np.testing.assert_array_equal(out[0].detach().numpy(), want, err_msg=f"occurrence {seen}")
            out.sum().backward()
            coll.apply_gradients()
        assert st.count_rows("t") == 1 and st.stats().dropped_unadmitted == 2


def test_eval_forwards_ask_without_counting(tmp_path):
    with EmbeddingStore(tmp_path / "s", [_table()]) as st:
        coll = EmbeddingCollection(st, [Feature("f", "t")], backend="cpu")
        keys = {"f": np.array([7, 7], np.uint64)}
        coll.eval()
        for _ in range(5):
            coll(keys)
        coll.train()
        out = coll(keys)  # the first training batch: 2 occurrences < 3
        (out["f"].sum()).backward()
        coll.apply_gradients()
        assert st.count_rows("t") == 0 and st.stats().dropped_unadmitted == 1


def test_pipelined_equals_sequential_with_admission(tmp_path):
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.nn.models import DeepFM, model_tables
    from damo_hybrid.pipeline.trainer import Trainer

    data = SyntheticCriteo(64, seed=3, vocab_min=100, vocab_max=2000)
    out = []
    for prefetch in (False, True):
        torch.manual_seed(0)
        tables = [TableConfig(t.name, t.dim, initializer=t.initializer, optimizer=t.optimizer, linear_column=True,
                              admission=AdmissionConfig(min_count=2))
                  for t in model_tables("deepfm", 4, OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.1))]
        with EmbeddingStore(tmp_path / f"s{prefetch}", tables) as st:
            m = DeepFM(st, data.sparse_fields, len(data.dense_fields), hidden=(8,), cache_mb=0.05,
                       min_cache_rows=2048, backend="cpu")
            Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-2), data.batch).fit(16, prefetch=prefetch)
            assert sum(c.stats.evictions for c in m.sparse.caches.values()) > 0
            keys = np.concatenate([k for k, _ in st.scan("emb")])
            out.append((keys, st.lookup("emb", keys), st.stats().dropped_unadmitted,
                        {k: v.clone() for k, v in m.state_dict().items()}))
    (k0, w0, d0, s0), (k1, w1, d1, s1) = out
    np.testing.assert_array_equal(k0, k1)
    np.testing.assert_array_equal(w0, w1)
    assert d0 == d1 > 0
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], rtol=0, atol=0)


def test_cli_min_count_resumes_exactly(tmp_path):
    from damo_hybrid.cli import main

    args = ["train", "--batch-size", "128", "--dim", "4", "--vocab-min", "100", "--vocab-max", "2000", "--min-count", "2",
            "--cache-mb", "1", "--eval-batches", "0", "--quiet", "--checkpoint-every", "3", "--threads", "1"]
    assert main([*args, "--steps", "6", "--store", str(tmp_path / "ref")]) == 0
    assert main([*args, "--steps", "3", "--store", str(tmp_path / "b")]) == 0
    assert main([*args, "--steps", "6", "--store", str(tmp_path / "b"), "--resume"]) == 0
    rows = []
    for name in ("ref", "b"):
        with EmbeddingStore(tmp_path / name, read_only=True) as st:
            assert st.tables["emb"].admission.min_count == 2
            keys = np.concatenate([k for k, _ in st.scan("emb")])
            rows.append((keys, st.lookup("emb", keys), st.table("emb").filter.counters.copy(),
                         st.stats().dropped_unadmitted))
    np.testing.assert_array_equal(rows[0][0], rows[1][0])
    np.testing.assert_allclose(rows[0][1], rows[1][1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(rows[0][2], rows[1][2])


def test_evaluating_during_training_changes_nothing_and_leaves_training_mode(tmp_path):
    """An evaluation between segments used to leave the model in eval mode, so the next segment's
    first prepare (in the host thread, before any compute) did not count admission."""
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.nn.models import DeepFM, model_tables
    from damo_hybrid.pipeline.trainer import Trainer

    data = SyntheticCriteo(64, seed=3, vocab_min=100, vocab_max=2000)
    held = SyntheticCriteo(64, seed=4, vocab_min=100, vocab_max=2000, split=1)
    out, evals = [], []
    for every in (0, 2):
        torch.manual_seed(0)
        tables = [TableConfig(t.name, t.dim, initializer=t.initializer, optimizer=t.optimizer, linear_column=True,
                              admission=AdmissionConfig(min_count=2))
                  for t in model_tables("deepfm", 4, OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.1))]
        with EmbeddingStore(tmp_path / f"s{every}", tables) as st:
            m = DeepFM(st, data.sparse_fields, len(data.dense_fields), hidden=(8,), backend="cpu")
            tr = Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-2), data.batch, held.batch)
            tr.fit(6, eval_every=every, on_eval=lambda s, a, ll: evals.append(s))
            assert m.training
            keys = np.concatenate([k for k, _ in st.scan("emb")])
            out.append((keys, st.lookup("emb", keys), st.table("emb").filter.counters.copy()))
    assert evals == [2, 4, 6]
    for a, b in zip(out[0], out[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cached", [False, True])
def test_a_stored_row_is_admitted_whatever_its_count(tmp_path, cached):
    """Review finding: turning admission on later (or counters rolled back by a crash) left stored
    rows out of training while lookup served them."""
    keys = np.array([1, 2, 3], np.uint64)
    plain = TableConfig("t", 4, optimizer=OptimizerConfig.sgd(0.1))
    with EmbeddingStore(tmp_path / "s", [plain]) as st:
        st.apply_gradients("t", keys, np.ones((3, 4), np.float32))
    adm = TableConfig("t", 4, optimizer=OptimizerConfig.sgd(0.1), admission=AdmissionConfig(min_count=3))
    with EmbeddingStore(tmp_path / "s", [adm], StoreConfig(allow_config_change=True)) as st:
        before = st.lookup("t", keys)
        if cached:
            coll = EmbeddingCollection(st, [Feature("f", "t")], backend="cpu")
            out = coll({"f": keys})["f"]
            np.testing.assert_array_equal(out.detach().numpy(), before)  # trained on what is served
            out.sum().backward()
            coll.apply_gradients()
        else:
            st.apply_gradients("t", keys, np.ones((3, 4), np.float32))
        np.testing.assert_allclose(st.lookup("t", keys), before - 0.1)
        assert st.stats().dropped_unadmitted == 0


def test_no_grad_forwards_and_eval_batches_do_not_admit(tmp_path):
    with EmbeddingStore(tmp_path / "s", [_table("zeros")]) as st:
        coll = EmbeddingCollection(st, [Feature("f", "t")], backend="cpu")
        k = {"f": np.array([9, 9, 9, 9], np.uint64)}  # min_count 3 reached within the batch itself
        with torch.no_grad():
            assert not coll(k)["f"].any()  # inference in training mode: asked, not counted, zeros
        coll.eval()
        assert not coll(k)["f"].any()
        coll.train()
        assert st.table("t").filter.count(np.array([9], np.uint64))[0] == 0
        assert coll(k)["f"].all()  # a training batch with 4 occurrences admits it
        coll.release()


def test_a_refused_key_is_read_once_and_counted_as_one_miss(tmp_path):
    """The bare store's step read the keys its count refused a second time (to see if they are
    stored), counting each one's miss twice."""
    with EmbeddingStore(tmp_path / "s", [_table()]) as st:
        st.apply_gradients("t", np.arange(10, dtype=np.uint64), np.ones((10, 4), np.float32))
        s = st.stats()
        assert (s.misses, s.hits, s.dropped_unadmitted) == (10, 0, 10)


def test_turning_admission_off_drops_its_counters(tmp_path):
    """Off and on again, admission starts counting afresh: the counters of before were no longer
    kept up to date while it was off (they used to be reloaded)."""
    keys = np.arange(5, dtype=np.uint64)
    with EmbeddingStore(tmp_path / "s", [_table()]) as st:
        st.apply_gradients("t", np.concatenate([keys, keys]), np.ones((10, 4), np.float32))  # counts 2 each
        assert (st._tables["t"].filter.count(keys) == 2).all()
    assert (tmp_path / "s" / "admission").is_dir() and any((tmp_path / "s" / "admission").iterdir())
    off = TableConfig("t", 4, initializer=InitializerConfig.normal(std=0.1), optimizer=OptimizerConfig.sgd(0.1))
    with EmbeddingStore(tmp_path / "s", [off], StoreConfig(allow_config_change=True)):
        pass
    assert not any((tmp_path / "s" / "admission").iterdir())
    with EmbeddingStore(tmp_path / "s", [_table()], StoreConfig(allow_config_change=True)) as st:
        assert (st._tables["t"].filter.count(keys) == 0).all()
