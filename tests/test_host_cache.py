"""The host tier against the store alone: a row's value never depends on the tier that served it."""

from __future__ import annotations

import numpy as np
import pytest

from damo_hybrid import (
    EmbeddingStore,
    InitializerConfig,
    OptimizerConfig,
    ScheduleConfig,
    TableConfig,
)

OPTS = [OptimizerConfig.sgd(0.1), OptimizerConfig.adagrad(0.1),
        OptimizerConfig.adam(0.01, schedule=ScheduleConfig(kind="exponential", decay_steps=3, decay_rate=0.5)),
        OptimizerConfig.ftrl(alpha=0.1, l1=0.01), OptimizerConfig.lion(0.01)]


def _table(opt):
    return TableConfig("t", 4, initializer=InitializerConfig.normal(std=0.1, seed=2), optimizer=opt)


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o.kind.value)
def test_cached_training_equals_store_alone_with_evictions(tmp_path, opt):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 300, 64).astype(np.uint64) for _ in range(40)]  # many repeats and duplicates
    grads = [rng.standard_normal((64, 4)).astype(np.float32) for _ in range(40)]
    with EmbeddingStore(tmp_path / "ref", [_table(opt)]) as ref, EmbeddingStore(tmp_path / "c", [_table(opt)]) as st:
        cache = st.cache_table("t", 80).host  # far smaller than the 300 keys: evictions happen
        for k, g in zip(batches, grads):
            np.testing.assert_array_equal(st.lookup("t", k), ref.lookup("t", k))
            ref.apply_gradients("t", k, g)
            cache.make_resident(np.unique(k))  # as the host manager would: evicts, writes back
            st.apply_gradients("t", k, g)  # a cached table: stepped in its tiers
        assert cache.stats.evictions > 0 and cache.stats.write_backs > 0 and cache.stats.hits > 0
        allk = np.arange(300, dtype=np.uint64)
        np.testing.assert_array_equal(st.lookup("t", allk), ref.lookup("t", allk))  # before any flush
        r1, f1 = ref.read_rows("t", allk)
        r2, f2 = st.read_rows("t", allk)
        np.testing.assert_array_equal(f1, f2)
        np.testing.assert_array_equal(r1.count, r2.count)
        np.testing.assert_array_equal(r1.state, r2.state)
        assert st.step("t") == ref.step("t") == 40
        st.flush()
        assert st.stats().rows == ref.stats().rows == st.count_rows("t")


def test_making_rows_resident_writes_nothing(tmp_path):
    with EmbeddingStore(tmp_path / "s", [_table(OPTS[0])]) as st:
        cache = st.cache_table("t", 4).host
        for i in range(5):
            cache.make_resident(np.arange(i * 3, i * 3 + 3, dtype=np.uint64))
        st.flush()
        assert st.count_rows("t") == 0 and cache.stats.write_backs == 0 and cache.stats.evictions > 0


def test_pinned_rows_are_never_evicted(tmp_path):
    with EmbeddingStore(tmp_path / "s", [_table(OPTS[0])]) as st:
        cache = st.cache_table("t", 8).host
        pinned = cache.make_resident(np.arange(6, dtype=np.uint64), pin=True)
        for i in range(10):
            cache.make_resident(np.array([100 + i, 200 + i], np.uint64))
        assert (cache.slots.lookup(np.arange(6, dtype=np.uint64)) == pinned).all()
        with pytest.raises(RuntimeError, match="cannot free 3 slots"):
            cache.make_resident(np.array([1000, 1001, 1002], np.uint64))
        cache.unpin(pinned)
        cache.make_resident(np.array([1000, 1001, 1002], np.uint64))


def test_bad_input(tmp_path):
    with EmbeddingStore(tmp_path / "s", [_table(OPTS[0]), TableConfig("u", 2)]) as st:
        st.cache_table("t", 8)
        with pytest.raises(TypeError, match="float32"):
            st.apply_gradients("t", np.array([1], np.uint64), np.ones((1, 4), np.float64))
        with pytest.raises(ValueError, match="capacity"):
            st.cache_table("u", 0)
        assert st.step("t") == 0 and st.tiers("u") is None


def test_rows_waiting_in_the_writer_are_served_from_it(tmp_path, monkeypatch):
    import threading

    from damo_hybrid.errors import OutOfSpaceError, WriteBackError

    with EmbeddingStore(tmp_path / "s", [_table(OPTS[0])]) as st:
        tiers = st.cache_table("t", 4)
        cache = tiers.host
        gate = threading.Event()
        real = cache.io.write

        def slow(*a, **k):
            assert gate.wait(10)
            real(*a, **k)

        monkeypatch.setattr(cache.io, "write", slow)
        k1 = np.arange(4, dtype=np.uint64)
        st.apply_gradients("t", k1, np.ones((4, 4), np.float32))
        w_after = st.lookup("t", k1)
        cache.make_resident(np.arange(10, 14, dtype=np.uint64))  # evicts the 4 dirty rows into the blocked writer
        assert cache.stats.write_backs == 4 and cache.writer.held == 4
        np.testing.assert_array_equal(st.lookup("t", k1), w_after)  # served from the queue, not stale disk
        cache.make_resident(k1)  # back from the queue
        np.testing.assert_array_equal(cache.weights[cache.slots.lookup(k1)], w_after)
        cache.make_resident(np.arange(20, 24, dtype=np.uint64))  # evicted again (clean now): nothing more queued
        gate.set()
        st.flush()
        assert st.count_rows("t") == 4 and st.stats().rows == 4
        np.testing.assert_array_equal(st.lookup("t", k1), w_after)

        fail = [True]

        def full(*a, **k):
            if fail[0]:
                raise OutOfSpaceError("disk full (simulated)")
            real(*a, **k)

        monkeypatch.setattr(cache.io, "write", full)
        k2 = np.arange(30, 34, dtype=np.uint64)
        st.apply_gradients("t", k2, np.ones((4, 4), np.float32))
        want = st.lookup("t", k2)
        with pytest.raises(WriteBackError, match="writing evicted rows of table 't' failed.*4 rows are held") as ei:
            st.flush()
        assert isinstance(ei.value.__cause__, OutOfSpaceError)
        np.testing.assert_array_equal(st.lookup("t", k2), want)  # nothing dropped: still served from memory
        with pytest.raises(WriteBackError):
            st.close()  # the store stays open and keeps the rows
        fail[0] = False  # space freed
        st.close()
    with EmbeddingStore(tmp_path / "s", [_table(OPTS[0])]) as st:
        np.testing.assert_array_equal(st.lookup("t", k2), want)
        assert st.count_rows("t") == 8


@pytest.mark.parametrize("logged", [False, True])
def test_unlogged_write_backs_are_durable_from_the_next_flush(tmp_path, logged):
    """StoreConfig.write_ahead_log: off, a crash loses the write-backs since the last flush (as it
    loses the dirty rows still cached); on, every write-back that reached RocksDB survives."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, numpy as np
        from damo_hybrid import EmbeddingStore, StoreConfig, TableConfig
        st = EmbeddingStore({str(tmp_path / "s")!r}, [TableConfig("t", 4)], StoreConfig(write_ahead_log={logged}))
        cache = st.cache_table("t", 8).host
        def train(lo):
            for i in range(lo, lo + 40, 4):
                k = np.arange(i, i + 4, dtype=np.uint64)
                cache.make_resident(k)
                st.apply_gradients("t", k, np.ones((4, 4), np.float32))
            cache.writer.drain()  # every write-back handed to RocksDB
        train(0)
        st.flush()
        flushed = st.count_rows("t")
        train(1000)
        print(flushed, st.count_rows("t"), flush=True)
        os._exit(0)  # a crash: no close
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flushed, before_crash = map(int, out.stdout.split())
    assert flushed == 40 and before_crash > flushed  # the second round wrote rows back too
    from damo_hybrid import EmbeddingStore
    with EmbeddingStore(tmp_path / "s") as st:
        assert st.count_rows("t") == (before_crash if logged else flushed)
        assert st.stats().table_rows["t"] == st.count_rows("t")


def test_a_failed_flush_at_close_keeps_unlogged_write_backs_and_the_store_open(tmp_path):
    """Without the WAL, rows written back live only in RocksDB's memtable until a flush: close()
    used to release the handle when that flush failed, losing them though it said to retry."""
    from damo_hybrid.errors import OutOfSpaceError

    st = EmbeddingStore(tmp_path / "s", [TableConfig("t", 4)])
    cache = st.cache_table("t", 8).host
    for i in range(0, 40, 4):
        k = np.arange(i, i + 4, dtype=np.uint64)
        cache.make_resident(k)
        st.apply_gradients("t", k, np.ones((4, 4), np.float32))
    real = st._storage.flush

    def full_disk():
        raise OutOfSpaceError("disk full (test)")

    st._storage.flush = full_disk
    with pytest.raises(OutOfSpaceError):
        st.close()
    assert not st.closed
    st._storage.flush = real  # space freed: close again
    st.close()
    with EmbeddingStore(tmp_path / "s") as again:
        assert again.count_rows("t") == 40


def test_a_write_back_that_fails_midway_resumes_at_its_first_unwritten_chunk(tmp_path, monkeypatch):
    from damo_hybrid.cache import writer as writer_mod
    from damo_hybrid.errors import OutOfSpaceError

    monkeypatch.setattr(writer_mod, "WRITE_CHUNK", 4)  # a 10-row batch is written in 3 chunks
    with EmbeddingStore(tmp_path / "s", [_table(OPTS[0])]) as st:
        cache = st.cache_table("t", 10).host
        real, calls = cache.io.write, []

        def second_chunk_fails_once(keys, rows, new):
            calls.append(len(keys))
            if len(calls) == 2:
                raise OutOfSpaceError("disk full (simulated)")
            real(keys, rows, new)

        monkeypatch.setattr(cache.io, "write", second_chunk_fails_once)
        keys = np.arange(10, dtype=np.uint64)
        st.apply_gradients("t", keys, np.ones((10, 4), np.float32))
        want = st.lookup("t", keys)
        st.flush()  # the writer's failure held the batch; the flush retries it from the failed chunk
        assert calls == [4, 4, 4, 2]  # the first chunk is not written (or counted) twice
        assert st.count_rows("t") == 10 and st.stats().rows == 10
        np.testing.assert_array_equal(st.lookup("t", keys), want)


def test_rows_used_in_several_batches_outlive_rows_seen_once(tmp_path):
    from damo_hybrid.cache.slots import SlotPool

    pool = SlotPool(2, "test pool")
    slots = pool.take(2, lambda v: None)
    pool.assign(np.array([7, 8], dtype=np.uint64), slots)
    for _ in range(3):
        pool.touch(pool.lookup(np.array([7], dtype=np.uint64)))  # key 7 used by three batches
    pool.touch(pool.lookup(np.array([8], dtype=np.uint64)))  # key 8 by one
    victim = pool.take(1, lambda v: None)
    assert pool.keys[victim].tolist() == [8]  # a one-bit CLOCK evicted 7 on its second lap
    # through the host tier: a row loaded by a batch enters unused and goes before a row used since
    with EmbeddingStore(tmp_path / "s", [_table(OPTS[0])]) as st:
        cache = st.cache_table("t", 4).host
        cache.make_resident(np.arange(4, dtype=np.uint64))
        cache.make_resident(np.array([0], dtype=np.uint64))  # key 0 found resident
        cache.make_resident(np.arange(10, 13, dtype=np.uint64))  # needs 3 slots
        assert sorted(cache.keys[cache.slots.lookup(np.array([0, 10, 11, 12], dtype=np.uint64))].tolist()) == [0, 10, 11, 12]
