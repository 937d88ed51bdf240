"""Behaviour every storage backend must show (MemoryStorage is the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from damo_hybrid import AdmissionConfig, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.errors import (
    NonFiniteGradientError,
    StoreClosedError,
    UnknownTableError,
)
from damo_hybrid.rows.initializers import RowInitializer

EDGE_KEYS = np.array([0, 2**63, 2**64 - 1], dtype=np.uint64)


def sgd_table(name: str = "t", dim: int = 4, lr: float = 0.5, **kw) -> TableConfig:
    return TableConfig(name, dim, initializer=InitializerConfig.normal(std=0.1, seed=3),
                       optimizer=OptimizerConfig.sgd(lr), **kw)


def test_lookup_unseen_returns_initial_row_and_stores_nothing(make_store):
    cfg = sgd_table()
    s = make_store([cfg])
    w = s.lookup("t", EDGE_KEYS)
    expect = RowInitializer(cfg.initializer, "t", 4)(EDGE_KEYS)
    np.testing.assert_array_equal(w, expect)
    assert s.stats().rows == 0 and s.stats().writes == 0
    assert s.count_rows("t") == 0


def test_edge_keys_are_distinct_rows(make_store):
    s = make_store([sgd_table()])
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    before = s.lookup("t", EDGE_KEYS)
    s.apply_gradients("t", EDGE_KEYS, g)
    after = s.lookup("t", EDGE_KEYS)
    np.testing.assert_array_equal(after, before - np.float32(0.5) * g)
    assert s.count_rows("t") == 3


def test_int64_keys_are_read_as_the_same_bits(make_store):
    s = make_store([sgd_table()])
    s.apply_gradients("t", EDGE_KEYS, np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(s.lookup("t", EDGE_KEYS.view(np.int64)), s.lookup("t", EDGE_KEYS))


def test_sgd_is_bit_exact_float32(make_store):
    s = make_store([sgd_table(lr=0.1)])
    rng = np.random.default_rng(0)
    keys = np.arange(50, dtype=np.uint64)
    w = s.lookup("t", keys)
    for _ in range(5):
        g = rng.standard_normal((50, 4)).astype(np.float32)
        s.apply_gradients("t", keys, g)
        w = w - np.float32(0.1) * g
    np.testing.assert_array_equal(s.lookup("t", keys), w)


def test_duplicate_keys_are_summed_then_stepped_once(make_store):
    s = make_store([TableConfig("t", 2, optimizer=OptimizerConfig.adam(0.1))])
    keys = np.array([5, 9, 5, 5], dtype=np.uint64)
    g = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=np.float32)
    s.apply_gradients("t", keys, g)
    rows, found = s.read_rows("t", np.array([5, 9], dtype=np.uint64))
    assert found.all()
    np.testing.assert_array_equal(rows.count, [1, 1])  # one update per key per call

    ref = make_store([TableConfig("t", 2, optimizer=OptimizerConfig.adam(0.1))])
    ref.apply_gradients("t", np.array([5, 9], dtype=np.uint64),
                        np.array([[13, 16], [3, 4]], dtype=np.float32))
    np.testing.assert_array_equal(s.lookup("t", keys), ref.lookup("t", keys))


def test_tables_are_separate_namespaces(make_store):
    s = make_store([sgd_table("a"), sgd_table("b")])
    k = np.array([42], dtype=np.uint64)
    b0 = s.lookup("b", k)
    s.apply_gradients("a", k, np.ones((1, 4), np.float32))
    np.testing.assert_array_equal(s.lookup("b", k), b0)
    assert not np.array_equal(s.lookup("a", k), s.lookup("b", k))


def test_many_tables(make_store):
    cfgs = [TableConfig(f"t{i}", 2) for i in range(2000)]
    s = make_store(cfgs)
    k = np.array([1], dtype=np.uint64)
    for i in (0, 1000, 1999):
        s.apply_gradients(f"t{i}", k, np.ones((1, 2), np.float32))
    assert s.stats().rows == 3


def test_nan_gradient_raises_and_writes_nothing(make_store):
    s = make_store([sgd_table()])
    keys = np.array([1, 2], dtype=np.uint64)
    s.apply_gradients("t", keys, np.ones((2, 4), np.float32))
    before = s.lookup("t", keys)
    g = np.ones((2, 4), np.float32)
    g[1, 2] = np.nan
    with pytest.raises(NonFiniteGradientError, match="NaN or Inf"):
        s.apply_gradients("t", keys, g)
    g[1, 2] = np.inf
    with pytest.raises(NonFiniteGradientError):
        s.apply_gradients("t", keys, g)
    np.testing.assert_array_equal(s.lookup("t", keys), before)


def test_nonfinite_skip_policy_drops_and_counts(make_store):
    s = make_store([sgd_table(nonfinite="skip")])
    keys = np.array([1, 2, 3], dtype=np.uint64)
    before = s.lookup("t", keys)
    g = np.ones((3, 4), np.float32)
    g[1, 0] = -np.inf
    s.apply_gradients("t", keys, g)
    after = s.lookup("t", keys)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]] - np.float32(0.5))
    assert s.stats().dropped_nonfinite == 1


@pytest.mark.parametrize(
    "keys, grads, exc, match",
    [
        ([1, 2], np.ones((2, 4), np.float32), TypeError, "keys must be a numpy array"),
        (np.array([1, 2], np.int32), np.ones((2, 4), np.float32), TypeError, "uint64 or int64"),
        (np.array([[1, 2]], np.uint64), np.ones((2, 4), np.float32), ValueError, "1-D"),
        (np.array([1, 2], np.uint64), np.ones((2, 4), np.float64), TypeError, "float32"),
        (np.array([1, 2], np.uint64), np.ones((2, 3), np.float32), ValueError, r"shape \(2, 4\)"),
        (np.array([1, 2], np.uint64), np.ones(8, np.float32), ValueError, "shape"),
    ],
)
def test_bad_input_is_rejected_and_writes_nothing(make_store, keys, grads, exc, match):
    s = make_store([sgd_table()])
    with pytest.raises(exc, match=match):
        s.apply_gradients("t", keys, grads)
    assert s.stats().writes == 0 and s.count_rows("t") == 0


def test_unknown_table(make_store):
    s = make_store([sgd_table()])
    with pytest.raises(UnknownTableError, match="unknown table 'nope'"):
        s.lookup("nope", EDGE_KEYS)


def test_empty_batches(make_store):
    s = make_store([sgd_table()])
    e = np.zeros(0, np.uint64)
    assert s.lookup("t", e).shape == (0, 4)
    s.apply_gradients("t", e, np.zeros((0, 4), np.float32))
    assert s.count_rows("t") == 0


def test_closed_store_raises(make_store):
    s = make_store([sgd_table()])
    s.close()
    with pytest.raises(StoreClosedError):
        s.lookup("t", EDGE_KEYS)


def test_admission_drops_until_min_count(make_store):
    adm = AdmissionConfig(min_count=3, capacity=1000, fpr=0.001)
    s = make_store([sgd_table(admission=adm)])
    k = np.array([7], dtype=np.uint64)
    init = s.lookup("t", k)
    g = np.ones((1, 4), np.float32)
    s.apply_gradients("t", k, g)
    s.apply_gradients("t", k, g)
    np.testing.assert_array_equal(s.lookup("t", k), init)
    assert s.count_rows("t") == 0 and s.stats().dropped_unadmitted == 2
    s.apply_gradients("t", k, g)  # third sighting: admitted, this gradient applies
    np.testing.assert_array_equal(s.lookup("t", k), init - np.float32(0.5))
    assert s.count_rows("t") == 1


def test_admission_counts_occurrences_within_a_call(make_store):
    s = make_store([sgd_table(admission=AdmissionConfig(min_count=2, capacity=1000))])
    s.apply_gradients("t", np.array([3, 3], np.uint64), np.ones((2, 4), np.float32))
    assert s.count_rows("t") == 1


def test_unadmitted_lookup_can_return_zeros(make_store):
    s = make_store([sgd_table(admission=AdmissionConfig(min_count=2, capacity=1000, unadmitted_value="zeros"))])
    np.testing.assert_array_equal(s.lookup("t", EDGE_KEYS), np.zeros((3, 4), np.float32))


def test_expire_by_count_and_age(make_store):
    import datetime as dt
    import time

    s = make_store([sgd_table()])
    a, b = np.array([1], np.uint64), np.array([2], np.uint64)
    g = np.ones((1, 4), np.float32)
    s.apply_gradients("t", a, g)
    s.apply_gradients("t", b, g)
    s.apply_gradients("t", b, g)
    assert s.expire(min_count=2) == 1
    np.testing.assert_array_equal(s.read_rows("t", np.array([1, 2], np.uint64))[1], [False, True])
    assert s.expire(older_than=dt.timedelta(days=1)) == 0
    assert s.expire(older_than=dt.timedelta(days=1), now=time.time() + 2 * 86400) == 1
    assert s.count_rows("t") == 0 and s.stats().rows == 0


def test_dump_filters_and_export_roundtrip(make_store, tmp_path):
    s = make_store([sgd_table("a"), sgd_table("b", dim=2)])
    k = np.array([1, 2, 3], np.uint64)
    s.apply_gradients("a", k, np.ones((3, 4), np.float32))
    s.apply_gradients("a", k[:1], np.ones((1, 4), np.float32))
    s.apply_gradients("b", k, np.ones((3, 2), np.float32))
    n = s.export(tmp_path / "all.npz")
    assert n == {"a": 3, "b": 3}
    z = np.load(tmp_path / "all.npz")
    np.testing.assert_array_equal(z["keys_a"], k)
    np.testing.assert_array_equal(z["weights_a"], s.lookup("a", k))
    assert z["weights_b"].shape == (3, 2) and z["keys_a"].dtype == np.uint64
    assert s.dump(tmp_path / "d.npz", tables=["a"], min_count=2) == {"a": 1}
    z = np.load(tmp_path / "d.npz")
    np.testing.assert_array_equal(z["keys_a"], [1])
    assert "keys_b" not in z
