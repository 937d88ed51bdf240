"""The record of stored keys: never hides a stored row, and skips the storage for new keys."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damo_hybrid import (
    EmbeddingStore,
    InitializerConfig,
    OptimizerConfig,
    StoreConfig,
    TableConfig,
)
from damo_hybrid.storage.backend import MemoryStorage
from damo_hybrid.storage.keyfilter import FILTER_DIR, StoredKeyFilter
from damo_hybrid.storage.meta import META, read_meta

T = TableConfig("emb", 4, initializer=InitializerConfig.normal(std=0.1), optimizer=OptimizerConfig.adagrad(0.1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=300), min_size=1, max_size=6),
       st.integers(8, 4096))
def test_every_key_added_is_reported_as_the_filter_grows(batches, max_bytes):
    kf = StoredKeyFilter(max_bytes, np.zeros(1, np.uint64))  # from one word: every doubling is exercised
    added: list[int] = []
    for b in batches:
        keys = np.array(b, dtype=np.uint64)
        added += b
        kf.add(keys, rows=len(set(added)))
        assert kf.may_contain(np.array(added, dtype=np.uint64)).all()
    assert len(kf.words) <= max(1, max_bytes // 8)


def test_it_grows_to_32_bits_per_row_and_lets_few_new_keys_through():
    kf = StoredKeyFilter(1 << 30)
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2**63, 200_000, dtype=np.uint64)
    for i in range(0, len(stored), 20_000):
        kf.add(stored[i:i + 20_000], rows=i + 20_000)
    assert kf.bits_per_row(len(stored)) >= 32
    assert kf.may_contain(stored).all()
    fresh = rng.integers(2**63, 2**64 - 1, 200_000, dtype=np.uint64)
    assert kf.may_contain(fresh).mean() < 0.02


class CountingStorage(MemoryStorage):
    """Counts the keys the store asks the storage for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def get(self, table_id, keys):
        self.asked += len(keys)
        return super().get(table_id, keys)


@pytest.mark.parametrize("mb", [0, 1])
def test_new_keys_skip_the_storage_and_results_do_not_change(mb):
    rng = np.random.default_rng(1)
    out = []
    storage = CountingStorage()
    with EmbeddingStore(None, [T], StoreConfig(key_filter_mb=mb), storage=storage) as s:
        for step in range(6):
            keys = rng.integers(0, 5000, 800).astype(np.uint64)
            s.apply_gradients("emb", keys, rng.normal(size=(len(keys), 4)).astype(np.float32))
        asked = storage.asked
        out.append(s.lookup("emb", np.arange(5000, dtype=np.uint64)))
        new = np.arange(10**6, 10**6 + 1000, dtype=np.uint64)
        storage.asked = 0
        s.lookup("emb", new)
        if mb:
            assert storage.asked < 50  # about 0.5% false positives
        else:
            assert storage.asked == 1000
    if mb:
        assert asked < 6 * 800  # the first step's keys were all new: never asked for
    np.testing.assert_array_equal(out[0], _reference(rng))


def _reference(_rng):
    rng = np.random.default_rng(1)
    with EmbeddingStore(None, [T], StoreConfig(key_filter_mb=0), storage=MemoryStorage()) as s:
        for step in range(6):
            keys = rng.integers(0, 5000, 800).astype(np.uint64)
            s.apply_gradients("emb", keys, rng.normal(size=(len(keys), 4)).astype(np.float32))
        return s.lookup("emb", np.arange(5000, dtype=np.uint64))


def _stored(path, keys):
    with EmbeddingStore(path, [T], StoreConfig(key_filter_mb=0), read_only=True) as s:
        return s.lookup("emb", keys)


def test_a_clean_close_saves_the_filter_and_a_reopen_trusts_only_that(tmp_path):
    path = tmp_path / "s"
    keys = np.arange(100, dtype=np.uint64)
    with EmbeddingStore(path, [T]) as s:
        s.apply_gradients("emb", keys, np.ones((100, 4), np.float32))
        assert not list((path / FILTER_DIR).glob("*.npy")) if (path / FILTER_DIR).exists() else True
    token = read_meta(path)["key_filter"]
    assert (path / FILTER_DIR / f"1-{token}.npy").is_file()
    with EmbeddingStore(path, [T]) as s:
        assert "key_filter" not in read_meta(path)  # open for writing: the saved filter is stale from now on
        assert not list((path / FILTER_DIR).iterdir())
        np.testing.assert_array_equal(s.lookup("emb", keys), _weights_after_one_step(keys))


def _weights_after_one_step(keys):
    with EmbeddingStore(None, [T], StoreConfig(key_filter_mb=0), storage=MemoryStorage()) as s:
        s.apply_gradients("emb", keys, np.ones((len(keys), 4), np.float32))
        return s.lookup("emb", keys)


def test_rows_written_after_the_last_clean_close_survive_a_crash(tmp_path):
    path = tmp_path / "s"
    first, later = np.arange(50, dtype=np.uint64), np.arange(1000, 1050, dtype=np.uint64)
    with EmbeddingStore(path, [T]) as s:
        s.apply_gradients("emb", first, np.ones((50, 4), np.float32))
    code = textwrap.dedent(f"""
        import os, numpy as np
        from damo_hybrid import EmbeddingStore
        s = EmbeddingStore({str(path)!r})
        s.apply_gradients("emb", np.arange(1000, 1050, dtype=np.uint64), np.ones((50, 4), np.float32))
        s.flush()
        os._exit(0)  # a crash: no close, the filter in memory is lost
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = _stored(path, later)
    with EmbeddingStore(path, [T]) as s:  # rebuilt from a scan: the later rows are found, not re-initialised
        np.testing.assert_array_equal(s.lookup("emb", later), want)
        np.testing.assert_array_equal(s.lookup("emb", later), _weights_after_one_step(later))


@pytest.mark.parametrize("damage", ["none", "filter file deleted", "written before filters"])
def test_a_checkpoint_restores_with_its_filter_or_rebuilds_it(tmp_path, damage):
    keys = np.arange(0, 3000, 7, dtype=np.uint64)
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", keys, np.ones((len(keys), 4), np.float32))
        ck = s.checkpoint(tmp_path / "ck")
    if damage == "filter file deleted":
        for p in (ck / FILTER_DIR).iterdir():
            os.remove(p)
    elif damage == "written before filters":  # nor manifests: an earlier version's checkpoint
        import json
        meta = json.loads((ck / META).read_text())
        del meta["key_filter"]
        (ck / META).write_text(json.dumps(meta))
        marker = json.loads((ck / "CHECKPOINT.json").read_text())
        del marker["manifest"]
        (ck / "CHECKPOINT.json").write_text(json.dumps(marker))
    with EmbeddingStore.from_checkpoint(ck, tmp_path / "r") as s:
        np.testing.assert_array_equal(s.lookup("emb", keys), _weights_after_one_step(keys))


def test_a_storage_handed_in_with_rows_is_scanned():
    storage = MemoryStorage()
    keys = np.arange(20, dtype=np.uint64)
    with EmbeddingStore(None, [T], StoreConfig(key_filter_mb=0), storage=storage) as s:
        s.apply_gradients("emb", keys, np.ones((20, 4), np.float32))
        want = s.lookup("emb", keys)
    storage._closed = False  # the same rows, handed to a second store
    with EmbeddingStore(None, [T], storage=storage) as s:
        np.testing.assert_array_equal(s.lookup("emb", keys), want)


def test_key_filter_mb_is_validated():
    with pytest.raises(ValueError, match="key_filter_mb"):
        StoreConfig(key_filter_mb=-1)


def test_a_table_added_later_over_stored_rows_finds_them():
    """Review finding: add_table gave a new table an empty filter, hiding rows its id already held."""
    storage = MemoryStorage()
    a, b = TableConfig("a", 4), TableConfig("b", 4)
    keys = np.arange(5, dtype=np.uint64)
    with EmbeddingStore(None, [a, b], StoreConfig(key_filter_mb=0), storage=storage) as s:
        s.apply_gradients("b", keys, np.ones((5, 4), np.float32))
        want = s.lookup("b", keys)
    storage._closed = False
    with EmbeddingStore(None, [a], storage=storage) as s:
        s.add_table(b)
        np.testing.assert_array_equal(s.lookup("b", keys), want)
        assert s.count_rows("b") == 5


def test_an_unreadable_filter_file_is_rebuilt_not_fatal(tmp_path):
    keys = np.arange(10, dtype=np.uint64)
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", keys, np.ones((10, 4), np.float32))
    for p in (tmp_path / "s" / FILTER_DIR).iterdir():
        p.write_bytes(b"")
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        np.testing.assert_array_equal(s.lookup("emb", keys), _weights_after_one_step(keys))


def test_nothing_prepares_once_close_has_flushed(tmp_path, monkeypatch):
    """Review finding: close() saved the key filters while another thread could still prepare a
    batch (and a later write-back could put a row the saved filter does not hold)."""
    from damo_hybrid.errors import StoreClosedError
    from damo_hybrid.nn import EmbeddingCollection, Feature

    s = EmbeddingStore(tmp_path / "s", [T])
    coll = EmbeddingCollection(s, [Feature("f", "emb")], backend="cpu")
    seen = []
    real = s._storage.flush

    def late_prepare():  # another thread's host manager, at the worst moment of close()
        try:
            coll.prepare({"f": np.array([1, 2], np.uint64)})
            seen.append("prepared")
        except StoreClosedError:
            seen.append("refused")
        real()

    monkeypatch.setattr(s._storage, "flush", late_prepare)
    s.close()
    assert seen == ["refused"]
