"""One owner per table's rows: the store's tiers are shared, and nothing cached is lost or stale.

Each case here lost updates or read stale rows when every collection kept its own caches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, StoreConfig, TableConfig
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
