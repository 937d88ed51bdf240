"""One owner per table's rows: the store's tiers are shared, and nothing cached is lost or stale.

Each case here lost updates or read stale rows when every collection kept its own caches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import (
    EmbeddingStore,
    InitializerConfig,
    OptimizerConfig,
    StoreConfig,
    TableConfig,
)
from damo_hybrid.errors import ConfigConflictError
from damo_hybrid.nn import EmbeddingCollection, Feature

TABLES = [TableConfig("t", 2, initializer=InitializerConfig.zeros(), optimizer=OptimizerConfig.sgd(0.1))]
KEY = np.array([7], np.uint64)


def _step(emb: EmbeddingCollection, n: int) -> None:
    """``n`` SGD steps with gradient 1 on every weight of key 7 (each moves it by -0.1)."""
    for _ in range(n):
        emb({"x": KEY})["x"].sum().backward()
        emb.apply_gradients()


@pytest.mark.parametrize("device_tier", [False, True], ids=["host", "device-tier-on-cpu"])
def test_close_without_collection_flush_keeps_every_update(tmp_path, device_tier):
    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu",
                                  device_cache_mb=1.0 if device_tier else None)
        _step(emb, 3)
        # no emb.flush(): leaving the with block must persist the cached rows
    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.3, -0.3]], rtol=1e-6)
        assert st.step("t") == 3 and st.count_rows("t") == 1


def test_two_collections_over_one_table_share_its_rows(tmp_path):
    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        a = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu")
        b = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu", cache_mb=3.0)  # asks for another budget
        assert a.tiers["t"] is b.tiers["t"]  # the first creation wins
        _step(a, 3)
        _step(b, 2)
        a.flush()
        b.flush()
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.5, -0.5]], rtol=1e-6)
    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.5, -0.5]], rtol=1e-6)


@pytest.mark.parametrize("device_tier", [False, True], ids=["host", "device-tier-on-cpu"])
def test_store_reads_see_rows_a_collection_holds(tmp_path, device_tier):
    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu",
                                  device_cache_mb=1.0 if device_tier else None)
        _step(emb, 2)
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.2, -0.2]], rtol=1e-6)
        rows, found = st.read_rows("t", KEY)
        assert found.all() and rows.count[0] == 2
        # the store's own step on a cached table goes through the same tiers
        st.apply_gradients("t", KEY, np.ones((1, 2), np.float32))
        _step(emb, 1)
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.4, -0.4]], rtol=1e-6)
        # export and dump see the newest row too
        st.export(tmp_path / "w.npz")
        with np.load(tmp_path / "w.npz") as z:
            np.testing.assert_allclose(z["weights_t"], [[-0.4, -0.4]], rtol=1e-6)
        # a deleted row leaves every tier, not only the disk
        st.delete("t", KEY)
        np.testing.assert_array_equal(st.lookup("t", KEY), [[0.0, 0.0]])
        _step(emb, 1)
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.1, -0.1]], rtol=1e-6)


def test_checkpoint_holds_cached_updates(tmp_path):
    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu")
        _step(emb, 4)
        st.checkpoint(tmp_path / "ck")
    with EmbeddingStore.from_checkpoint(tmp_path / "ck", tmp_path / "r") as st:
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.4, -0.4]], rtol=1e-6)


def test_budgets_come_from_the_store_config_and_devices_must_agree(tmp_path):
    cfg = StoreConfig(cache_mb=1.0, min_cache_rows=10)
    with EmbeddingStore(tmp_path / "s", TABLES, cfg) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu")
        host = emb.tiers["t"].host
        assert host.capacity == int(2**20 / host.nbytes_per_row(2, 0))
        with pytest.raises(ConfigConflictError, match="same backend"):
            EmbeddingCollection(st, [Feature("x", "t")], backend="cpu", device_cache_mb=1.0)


def test_eval_forwards_need_no_apply(tmp_path):
    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu")
        emb.eval()
        with torch.no_grad():
            emb({"x": KEY})
            emb({"x": KEY})
        assert (emb.tiers["t"].host.pins == 0).all()
        emb.train()
        _step(emb, 1)
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.1, -0.1]], rtol=1e-6)


# ------------------------------------------------ found in review of the store-owned tiers


def _sgd_table(name="t", dim=2):
    return TableConfig(name, dim, initializer=InitializerConfig.zeros(), optimizer=OptimizerConfig.sgd(0.1))


def test_flush_retries_held_rows_even_with_newer_dirty_rows(tmp_path, monkeypatch):
    from damo_hybrid.errors import OutOfSpaceError, WriteBackError

    with EmbeddingStore(tmp_path / "s", [_sgd_table()]) as st:
        host = st.cache_table("t", 4).host
        real, fail = host.io.write, [True]

        def write(*a, **k):
            if fail[0]:
                raise OutOfSpaceError("disk full (simulated)")
            real(*a, **k)

        monkeypatch.setattr(host.io, "write", write)
        host.make_resident(np.arange(4, dtype=np.uint64))
        st.apply_gradients("t", np.arange(3, dtype=np.uint64), np.ones((3, 2), np.float32))
        with pytest.raises(WriteBackError):
            st.flush()
        before = st.lookup("t", np.arange(10, dtype=np.uint64))
        with pytest.raises(WriteBackError):  # key 9 is not resident: its row would go to the failed writer
            st.apply_gradients("t", np.array([1, 9], np.uint64), np.ones((2, 2), np.float32))
        np.testing.assert_array_equal(st.lookup("t", np.arange(10, dtype=np.uint64)), before)  # nothing half-done
        st.apply_gradients("t", np.arange(2, 4, dtype=np.uint64), np.ones((2, 2), np.float32))  # resident: dirty again
        with pytest.raises(WriteBackError):
            st.flush()
        fail[0] = False  # space freed: the next flush writes everything
        st.flush()
        want = st.lookup("t", np.arange(4, dtype=np.uint64))
    with EmbeddingStore(tmp_path / "s", [_sgd_table()]) as st:
        np.testing.assert_array_equal(st.lookup("t", np.arange(4, dtype=np.uint64)), want)
        assert st.count_rows("t") == st.stats().rows == 4


def test_a_write_back_failing_half_way_counts_no_row_twice(tmp_path, monkeypatch):
    import damo_hybrid.cache.host as host_mod
    from damo_hybrid.errors import WriteBackError

    monkeypatch.setattr(host_mod, "_WRITE_CHUNK", 2)
    with EmbeddingStore(tmp_path / "s", [_sgd_table()]) as st:
        host = st.cache_table("t", 8).host
        host.make_resident(np.arange(4, dtype=np.uint64))
        st.apply_gradients("t", np.arange(4, dtype=np.uint64), np.ones((4, 2), np.float32))
        real, calls = host.writer.submit, [0]

        def submit(*a, **k):
            calls[0] += 1
            if calls[0] == 2:
                raise WriteBackError("simulated")
            real(*a, **k)

        monkeypatch.setattr(host.writer, "submit", submit)
        with pytest.raises(WriteBackError):
            st.flush()
        monkeypatch.setattr(host.writer, "submit", real)
        st.flush()
        assert st.stats().rows == st.count_rows("t") == 4


def test_a_collection_cannot_train_after_its_store_closed(tmp_path):
    from damo_hybrid.errors import StoreClosedError

    st = EmbeddingStore(tmp_path / "s", TABLES)
    emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu")
    emb({"x": KEY})["x"].sum().backward()
    st.close()
    with pytest.raises(StoreClosedError):
        emb.apply_gradients()
    with pytest.raises(StoreClosedError):
        emb.prepare({"x": KEY})


def test_a_device_tier_larger_than_the_host_tier_flushes(tmp_path):
    keys = np.arange(40, dtype=np.uint64)
    with EmbeddingStore(tmp_path / "s", [_sgd_table()]) as st:
        st.cache_table("t", 4, 64, "cpu")  # 64 device rows above 4 host rows
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu", device_cache_mb=1.0)
        emb({"x": keys})["x"].sum().backward()
        emb.apply_gradients()
        assert int(st.tiers("t").device.dirty.sum()) == 40
    with EmbeddingStore(tmp_path / "s", [_sgd_table()]) as st:
        np.testing.assert_allclose(st.lookup("t", keys), np.full((40, 2), -0.1, np.float32), rtol=1e-6)
        assert st.count_rows("t") == st.stats().rows == 40


def test_store_steps_on_a_cached_table_are_not_limited_by_its_size(tmp_path):
    rng = np.random.default_rng(0)
    with EmbeddingStore(tmp_path / "ref", [_sgd_table()]) as ref, EmbeddingStore(tmp_path / "c", [_sgd_table()]) as st:
        st.cache_table("t", 4)
        for _ in range(3):
            k = rng.integers(0, 300, 200).astype(np.uint64)  # far more distinct keys than 4 slots
            g = rng.standard_normal((200, 2)).astype(np.float32)
            ref.apply_gradients("t", k, g)
            st.apply_gradients("t", k, g)
        allk = np.arange(300, dtype=np.uint64)
        np.testing.assert_array_equal(st.lookup("t", allk), ref.lookup("t", allk))
        st.flush()
        assert st.count_rows("t") == st.stats().rows == ref.count_rows("t")


def test_a_read_only_store_serves_a_collection_but_refuses_its_steps(tmp_path):
    from damo_hybrid.errors import DamoHybridError

    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        st.apply_gradients("t", KEY, np.ones((1, 2), np.float32))
    with EmbeddingStore(tmp_path / "s", read_only=True) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu")
        with torch.no_grad():
            np.testing.assert_allclose(emb({"x": KEY})["x"].numpy(), [[-0.1, -0.1]], rtol=1e-6)
        emb({"x": KEY})["x"].sum().backward()
        with pytest.raises(DamoHybridError, match="read_only"):
            emb.apply_gradients()


def test_a_failed_cache_call_caches_nothing(tmp_path, monkeypatch):
    import damo_hybrid.cache.registry as registry

    made = []
    real = registry.TableTiers

    def second_fails(io, *a, **k):  # the second table's tiers cannot be allocated
        if made:
            raise MemoryError("no memory for the host tier")
        made.append(io.table.name)
        return real(io, *a, **k)

    monkeypatch.setattr(registry, "TableTiers", second_fails)
    with EmbeddingStore(tmp_path / "s", [_sgd_table(), TableConfig("a", 2)]) as st:
        with pytest.raises(MemoryError):
            st.cache(["t", "a"])
        assert made and st.tiers("t") is None and st.tiers("a") is None


def test_pickling_a_model_says_how_to_save_it(tmp_path):
    import copy
    import pickle

    from damo_hybrid.models import DeepFM

    with EmbeddingStore(tmp_path / "s", [TableConfig("emb", 4), TableConfig("lin", 1)]) as st:
        m = DeepFM(st, ["a", "b"], 2, hidden=(8,), backend="cpu")
        for attempt in (lambda: pickle.dumps(m), lambda: copy.deepcopy(m)):
            with pytest.raises(TypeError, match=r"store\.checkpoint.*store\.export"):
                attempt()
        assert all(not k.startswith("sparse") for k in m.state_dict())  # only dense weights


def test_a_nan_in_one_table_steps_no_table(tmp_path):
    from damo_hybrid.errors import NonFiniteGradientError

    tables = [_sgd_table("a"), _sgd_table("b")]
    with EmbeddingStore(tmp_path / "s", tables) as st:
        emb = EmbeddingCollection(st, [Feature("x", "a"), Feature("y", "b")], backend="cpu")
        out = emb({"x": KEY, "y": KEY})
        (out["x"].sum() + out["y"].sum() * float("nan")).backward()
        with pytest.raises(NonFiniteGradientError, match="table 'b'"):
            emb.apply_gradients()
        np.testing.assert_array_equal(st.lookup("a", KEY), [[0.0, 0.0]])  # 'a' was not stepped either
        assert st.step("a") == st.step("b") == 0
        assert all((c.pins == 0).all() for c in emb.caches.values())


def test_a_step_during_a_flush_is_not_marked_clean(tmp_path, monkeypatch):
    """The worker steps a row while a flush copies it: the step must wait, or it would be marked clean unwritten."""
    import threading

    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu")
        _step(emb, 1)  # row dirty in the host tier
        emb({"x": KEY})["x"].sum().backward()  # the worker's next step is ready
        host = emb.tiers["t"].host
        real = host.writer.submit
        worker = threading.Thread(target=emb.apply_gradients)

        def submit(*a, **k):  # the flush has copied the row and not yet marked it clean
            real(*a, **k)
            if not worker.is_alive() and worker.ident is None:
                worker.start()
                worker.join(0.3)  # without the step lock the step lands here

        monkeypatch.setattr(host.writer, "submit", submit)
        st.flush()
        monkeypatch.undo()
        worker.join(10)
        st.flush()
    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        np.testing.assert_allclose(st.lookup("t", KEY), [[-0.2, -0.2]], rtol=1e-6)


def test_a_deleted_row_does_not_come_back_through_a_concurrent_prepare(tmp_path, monkeypatch):
    import threading

    from damo_hybrid.storage.rowio import RowIO

    with EmbeddingStore(tmp_path / "s", TABLES) as st:
        emb = EmbeddingCollection(st, [Feature("x", "t")], backend="cpu")
        _step(emb, 1)
        st.flush()
        st.tiers("t").host.discard(KEY)  # the row is only on disk now
        prepared = []
        host_manager = threading.Thread(target=lambda: prepared.append(emb.prepare({"x": KEY})))
        real = RowIO.delete

        def delete(self, t, keys):  # between the tiers' discard and the storage delete
            host_manager.start()
            host_manager.join(0.3)  # without the tier lock held throughout, it reloads the row here
            return real(self, t, keys)

        monkeypatch.setattr(RowIO, "delete", delete)
        st.delete("t", KEY)
        monkeypatch.undo()
        host_manager.join(10)
        emb.release(prepared[0])
        np.testing.assert_array_equal(st.lookup("t", KEY), [[0.0, 0.0]])
        st.flush()
        assert st.count_rows("t") == st.stats().rows == 0
