from __future__ import annotations

import numpy as np
import pytest

from damo_hybrid.data.metrics import auc, logloss
from damo_hybrid.data.synthetic import SyntheticCriteo, zipf_ranks


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    ref = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auc(y, s) == pytest.approx(ref)
    assert auc(np.ones(3), np.arange(3)) == 0.5


def test_logloss():
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


def test_synthetic_is_deterministic_and_criteo_like():
    d = SyntheticCriteo(2048, seed=3)
    a, b = d.batch(5), d.batch(5)
    for f in d.sparse_fields:
        np.testing.assert_array_equal(a.sparse[f], b.sparse[f])
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(d.batch(6).label, a.label)
    assert len(d.sparse_fields) == 26 and a.dense.shape == (2048, 13)
    assert 0.1 < a.label.mean() < 0.6
    share = np.mean([len(np.unique(a.sparse[f])) / 2048 for f in d.sparse_fields])
    assert 0.2 < share < 0.8  # Zipf: many repeats within a batch, many singletons too


def test_zipf_ranks_bounds():
    r = zipf_ranks(np.random.default_rng(0), 100000, 50)
    assert r.min() == 0 and r.max() == 49 and (np.bincount(r)[0] > np.bincount(r)[10])


def test_stage_clock_counts_the_host_and_worker_stages_of_a_step(tmp_path):
    """The breakdown the training benchmark reports: every stage of a cached step is counted
    while the clock runs, and nothing while it is off."""
    from damo_hybrid import EmbeddingStore, OptimizerConfig, TableConfig
    from damo_hybrid.nn import EmbeddingCollection, Feature
    from damo_hybrid.timing import CLOCK

    with EmbeddingStore(tmp_path / "s", [TableConfig("t", 4, optimizer=OptimizerConfig.adagrad(0.1))]) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], cache_mb=1e-6, min_cache_rows=64, backend="cpu")

        def step(keys):
            emb({"x": keys})["x"].sum().backward()
            emb.apply_gradients()

        step(np.arange(64, dtype=np.uint64))
        st.flush()
        CLOCK.enable()
        try:
            step(np.arange(32, 96, dtype=np.uint64))  # 32 hits, 32 new keys, 32 evictions of written rows
            step(np.arange(0, 32, dtype=np.uint64))  # evicted earlier: read back from RocksDB
            st.flush()
            secs, counts = CLOCK.snapshot(), CLOCK.counts()
        finally:
            CLOCK.disable()
        assert counts["unique"] == 96 and counts["hits"] == 32 and counts["init"] == 32
        assert counts["rocksdb_read"] == 32 and counts["evict"] == 64
        for stage in ("dedup", "index", "victims", "evict", "rocksdb_read", "decode", "init", "encode", "rocksdb_write"):
            assert secs[stage] > 0, stage
        step(np.arange(96, 128, dtype=np.uint64))  # off: nothing more is counted
        assert CLOCK.counts() == counts


def test_training_and_host_benchmarks_report_steady_state_breakdowns(tmp_path):
    from damo_hybrid.bench.host import bench_host
    from damo_hybrid.bench.train import STAGES, run_train_bench

    r = run_train_bench(steps=3, warmup=1, rows=50_000, fractions=(0.25,), max_warmup=2, batch=256,
                        row_dtypes=("float32", "bfloat16"), log=lambda s: None)
    d, half = r["damo"]
    assert (d["row_dtype"], half["row_dtype"]) == ("float32", "bfloat16") and "error" not in half
    assert half["cache_mb"] == d["cache_mb"]  # one budget for both (its rows: test_a_16_bit_cache_budget_holds_more_rows)
    assert "error" not in d and d["timed_steps"] == 3 and d["steady_after_steps"] <= 2
    assert set(d["per_step_ms"]) == set(STAGES) and d["per_step_ms"]["forward"] > 0
    assert d["per_step_keys"]["unique"] > 0 and d["ratio_to_torch"] > 0 and "cores" in r["machine"]
    assert len(r["torch_runs"]) == 3  # torch again after each damo run: a ratio is against the mean around it
    assert d["ratio_to_torch"] == d["samples_per_s"] / (sum(r["torch_runs"][:2]) / 2)
    assert half["ratio_to_torch"] == half["samples_per_s"] / (sum(r["torch_runs"][1:]) / 2)
    h = bench_host(tmp_path, threads=2, vocab=20_000, fraction=0.25, batch=4000, batches=3)
    assert h["filled"] and h["unique_keys_per_s"] > 0 and h["per_core"] <= h["unique_keys_per_s"]


def test_the_training_benchmarks_memory_ceiling_changes_only_where_rows_are_stored():
    """``storages=("rocksdb", "memory")``: the second run keeps its rows in a dict, not RocksDB;
    the caches see the same keys, so hits, reads and evictions are the same in both."""
    from damo_hybrid.bench.train import run_train_bench

    # batches of 2,048 fill the smallest cache (65,536 rows) in a few steps: the timed ones evict
    r = run_train_bench(steps=2, warmup=1, rows=50_000, fractions=(0.05,), max_warmup=8, batch=2048,
                        storages=("rocksdb", "memory"), worker_threads=1, log=lambda s: None)
    disk, mem = r["damo"]
    assert (disk["storage"], mem["storage"]) == ("rocksdb", "memory")
    assert disk["torch_threads"] == mem["torch_threads"] == 1
    assert disk["per_step_keys"] == mem["per_step_keys"] and disk["per_step_keys"]["evictions"] > 0
