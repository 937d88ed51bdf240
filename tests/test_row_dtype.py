"""16-bit rows: the rounding (unbiased, reproducible, the torch twin equal to numpy), the stored
format, the caches' budgets, the fixed config, and training through every path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.errors import (
    ConfigConflictError,
    CorruptRowError,
    NonFiniteUpdateError,
)
from damo_hybrid.nn import EmbeddingCollection, Feature
from damo_hybrid.precision import RowDtype, RowPrecision
from damo_hybrid.rows.codec import RowCodec, Rows

SIXTEEN = ["float16", "bfloat16", "int16"]
RNG = np.random.default_rng(0)


def _neighbours(p: RowPrecision, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid values just below and above ``w`` (float64), by the format's own casts."""
    x = w.astype(np.float64)
    if p.dtype is RowDtype.INT16:
        return np.floor(x / p.step) * p.step, np.ceil(x / p.step) * p.step
    if p.dtype is RowDtype.FLOAT16:
        near = x.astype(np.float16).astype(np.float64)
        other = np.where(near > x, np.nextafter(near.astype(np.float16), np.float16(-np.inf)),
                         np.nextafter(near.astype(np.float16), np.float16(np.inf))).astype(np.float64)
    else:  # bfloat16: float32's bits cut to their high half (toward zero), and one step away
        bits = w.view(np.uint32) & np.uint32(0xFFFF0000)
        near = bits.view(np.float32).astype(np.float64)
        other = (bits + np.uint32(0x10000)).view(np.float32).astype(np.float64)
    return np.minimum(near, other), np.maximum(near, other)


@pytest.mark.parametrize("dtype", SIXTEEN)
def test_stochastic_rounding_picks_a_neighbour_is_unbiased_and_reproducible(dtype):
    p = RowPrecision(dtype, salt=7)
    w = (RNG.standard_normal((64, 8)) * 0.3).astype(np.float32)
    keys = RNG.integers(0, 2**63, 64, dtype=np.uint64)
    lo, hi = _neighbours(p, w)
    total = np.zeros(w.shape)
    n = 2000
    for count in range(1, n + 1):
        r = p.stochastic(w, keys, np.full(64, count)).astype(np.float64)
        assert ((r == lo) | (r == hi)).all()
        total += r
    mean_err = total / n - w
    spacing = np.maximum(hi - lo, 1e-30)
    # each element's mean is within 4 standard errors of w (a Bernoulli of at most 1/2 per draw)
    assert (np.abs(mean_err) <= 4 * 0.5 * spacing / np.sqrt(n)).mean() > 0.99
    assert abs((mean_err / spacing).mean()) < 0.01  # and the bias over all of them is ~0
    again = p.stochastic(w, keys, np.full(64, 5))
    np.testing.assert_array_equal(again, p.stochastic(w, keys, np.full(64, 5)))
    assert not np.array_equal(again, p.stochastic(w, keys, np.full(64, 6)))  # a new stream per update
    assert not np.array_equal(again, RowPrecision(dtype, salt=8).stochastic(w, keys, np.full(64, 5)))


@pytest.mark.parametrize("dtype", SIXTEEN)
def test_small_updates_survive_on_average(dtype):
    """A weight stepped by much less than half a grid step still moves by the sum of the steps."""
    p = RowPrecision(dtype, salt=3)
    w = np.full((256, 4), 0.5, np.float32)
    keys = np.arange(256, dtype=np.uint64)
    delta = np.float32(1e-5)  # far below the spacing at 0.5 of every format (>= 2**-13)
    for count in range(1, 201):
        w = p.stochastic(w - delta, keys, np.full(256, count))
    np.testing.assert_allclose(w.mean(), 0.5 - 200 * 1e-5, atol=3e-4)


@pytest.mark.parametrize("dtype", [*SIXTEEN, "float32"])
def test_the_torch_twin_rounds_bit_for_bit_like_numpy(dtype):
    p = RowPrecision(dtype, salt=0xDEADBEEFCAFEF00D)
    w = (RNG.standard_normal((300, 5)) * np.array([1e-9, 1e-3, 0.3, 20, 3000])).astype(np.float32)
    w[0, 0], w[1, 1], w[2, 2], w[3, 3] = np.nan, np.inf, -0.0, 65510.0  # float16 overflows near its max
    w[4] = [1e-40, -3e-39, 2.0**-133, 3.3e38, -1e-45]  # float32 subnormals, bfloat16's smallest, its top
    keys = RNG.integers(0, 2**64 - 1, 300, dtype=np.uint64)
    count = RNG.integers(1, 2**40, 300)
    want = p.stochastic(w, keys, count)
    got = p.stochastic_t(torch.from_numpy(w), torch.from_numpy(keys.view(np.int64)), torch.from_numpy(count))
    np.testing.assert_array_equal(got.numpy(), want)
    fin = np.isfinite(want).all(axis=1)
    np.testing.assert_array_equal(p.unpack_t(p.pack_t(torch.from_numpy(want[fin]))).numpy(), want[fin])


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", SIXTEEN)
def test_the_cuda_rounding_equals_the_cpu_twin(dtype):
    p = RowPrecision(dtype, salt=11)
    w = (RNG.standard_normal((4096, 16)) * 0.1).astype(np.float32)
    w[0, :8] = [np.nan, np.inf, -0.0, 65510.0, 1e-40, -3e-39, 2.0**-133, 3.3e38]
    keys = RNG.integers(0, 2**63, 4096, dtype=np.uint64)
    count = RNG.integers(1, 1000, 4096)
    got = p.stochastic_t(torch.from_numpy(w).cuda(), torch.from_numpy(keys.view(np.int64)).cuda(),
                         torch.from_numpy(count).cuda())
    np.testing.assert_array_equal(got.cpu().numpy(), p.stochastic(w, keys, count))  # NaN == NaN here


def test_nearest_rounding_matches_each_formats_cast_and_int16_clips():
    w = (RNG.standard_normal((100, 6)) * 0.05).astype(np.float32)
    np.testing.assert_array_equal(RowPrecision("float16").nearest(w), w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(RowPrecision("bfloat16").nearest(w),
                                  torch.from_numpy(w).to(torch.bfloat16).float().numpy())
    p = RowPrecision("int16", int16_step=2**-10)
    got = p.nearest(np.array([[0.0012, -100.0, 100.0]], np.float32))
    np.testing.assert_array_equal(got, [[2**-10, -32767 * 2**-10, 32767 * 2**-10]])


@pytest.mark.parametrize("dtype", SIXTEEN)
@pytest.mark.parametrize("dim", [1, 4, 5])
def test_a_16_bit_row_is_stored_in_half_the_weight_bytes_and_read_back_exactly(dtype, dim):
    p = RowPrecision(dtype)
    codec, wide = RowCodec("t", dim, 3, p), RowCodec("t", dim, 3)
    assert codec.nbytes == wide.nbytes - 4 * dim + 4 * ((dim + 1) // 2)
    keys = np.arange(9, dtype=np.uint64)
    rows = Rows(p.nearest(RNG.standard_normal((9, dim)).astype(np.float32)), RNG.random((9, 3), np.float32),
                np.arange(9), np.arange(9) + 100, np.arange(9) + 200)
    got, found = codec.decode(keys, codec.encode(keys, rows))
    assert found.all()
    for f in ("weights", "state", "count", "created", "updated"):
        np.testing.assert_array_equal(getattr(got, f), getattr(rows, f))
    other = RowCodec("t", dim, 3, RowPrecision("float16" if dtype != "float16" else "int16"))
    with pytest.raises(CorruptRowError, match=f"row holds {dtype} weights"):
        other.decode(keys, codec.encode(keys, rows))


def _table(dtype, **kw):
    kw.setdefault("optimizer", OptimizerConfig.adagrad(0.1))
    return TableConfig("t", 8, initializer=InitializerConfig.normal(std=0.1, seed=1), row_dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", SIXTEEN)
def test_every_update_path_gives_the_same_16_bit_rows(tmp_path, dtype):
    """The store's uncached path, the host tier (resident and stepped through) and the
    collection round alike: a row's value depends on its key and updates only."""
    keys = RNG.integers(0, 2**63, 300, dtype=np.uint64)
    grads = [RNG.standard_normal((300, 8)).astype(np.float32) for _ in range(4)]
    results = []
    for cached in (None, 64, 10_000):
        with EmbeddingStore(tmp_path / f"s{cached}", [_table(dtype)]) as st:
            if cached:
                st.cache_table("t", cached)
            for g in grads:
                st.apply_gradients("t", keys, g)
            st.flush()
            results.append(st.read_rows("t", keys)[0])
    with EmbeddingStore(tmp_path / "coll", [_table(dtype)]) as st:
        coll = EmbeddingCollection(st, [Feature("f", "t")], cache_mb=1e-9, min_cache_rows=400, backend="cpu")
        for g in grads:
            out = coll({"f": keys.view(np.int64)})["f"]
            out.backward(torch.from_numpy(g))
            coll.apply_gradients()
        coll.flush()
        results.append(st.read_rows("t", keys)[0])
    p = RowPrecision(dtype)
    for r in results[1:]:
        np.testing.assert_array_equal(r.weights, results[0].weights)
        np.testing.assert_array_equal(r.state, results[0].state)
    w = results[0].weights
    np.testing.assert_array_equal(p.unpack(p.pack(w)), w)  # on the grid
    with EmbeddingStore(tmp_path / "f32", [_table("float32")]) as st:  # and close to float32 training
        for g in grads:
            st.apply_gradients("t", keys, g)
        ref = st.read_rows("t", keys)[0].weights
    assert np.abs(w - ref).max() < (0.01 if dtype == "bfloat16" else 2e-3)


def test_a_16_bit_cache_budget_holds_more_rows(tmp_path):
    caps = {}
    for dtype in ("float32", "bfloat16"):
        with EmbeddingStore(tmp_path / dtype, [TableConfig("t", 32, row_dtype=dtype)]) as st:
            host = st.cache(["t"], cache_mb=8, min_cache_rows=1)["t"].host
            assert host.weights.dtype == (np.float32 if dtype == "float32" else np.uint16)
            caps[dtype], width = host.capacity, host.width
    # 32 weights of 4 or 2 bytes; the state, metadata, key index and policy cost the same per slot
    from damo_hybrid.cache.host import HostCache

    other = HostCache.nbytes_per_row(32, width, 4) - 4 * 32
    assert other == HostCache.nbytes_per_row(32, width, 2) - 2 * 32
    assert caps["bfloat16"] / caps["float32"] == pytest.approx((4 * 32 + other) / (2 * 32 + other), rel=1e-3)


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "host tier"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_an_update_beyond_the_int16_range_is_refused_not_saturated(tmp_path, policy, cached):
    cfg = _table("int16", int16_step=2**-20, nonfinite=policy, optimizer=OptimizerConfig.sgd(1.0))  # range +-0.031
    with EmbeddingStore(tmp_path / "s", [cfg]) as st:
        keys = np.array([1, 2], np.uint64)
        if cached:
            st.cache_table("t", 64).host.make_resident(keys)  # stepped in the slab (stage_slots)
        g = np.zeros((2, 8), np.float32)
        g[0, 0] = -1.0  # key 1 would reach ~1.0
        if policy == "raise":
            with pytest.raises(NonFiniteUpdateError, match="overflows int16 .* larger int16_step"):
                st.apply_gradients("t", keys, g)
            assert st.count_rows("t") == 0
        else:
            st.apply_gradients("t", keys, g)
            assert st.stats().dropped_nonfinite == 1
            assert st.read_rows("t", keys)[1].tolist() == [False, True]


def test_row_dtype_is_stored_checkpointed_and_fixed(tmp_path):
    cfg = _table("int16", int16_step=2**-12)
    with EmbeddingStore(tmp_path / "s", [cfg]) as st:
        st.apply_gradients("t", np.arange(5, dtype=np.uint64), np.ones((5, 8), np.float32))
        want = st.lookup("t", np.arange(5, dtype=np.uint64))
        st.checkpoint(tmp_path / "ck")
    with EmbeddingStore.from_checkpoint(tmp_path / "ck", tmp_path / "r") as r:
        assert r.tables["t"].row_dtype is RowDtype.INT16 and r.tables["t"].int16_step == 2**-12
        np.testing.assert_array_equal(r.lookup("t", np.arange(5, dtype=np.uint64)), want)
    for changed in (_table("float32"), _table("int16"), _table("float16")):
        with pytest.raises(ConfigConflictError, match="row_dtype"):
            EmbeddingStore(tmp_path / "s", [changed])


@pytest.mark.parametrize("bad, match", [
    (dict(row_dtype="fp8"), "row_dtype must be one of"),
    (dict(row_dtype="int16", int16_step=0.001), "power of two"),
    (dict(row_dtype="int16", int16_step=2**-30), "power of two"),
    (dict(int16_step=2**-10), "int16_step applies to row_dtype='int16' only"),
])
def test_bad_row_formats_say_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        TableConfig("t", 4, **bad)


def test_train_from_a_toml_config_inspect_export_and_dump(tmp_path, capsys):
    from damo_hybrid.cli import main

    store = tmp_path / "s"
    cfg = tmp_path / "run.toml"
    cfg.write_text('[train]\nrow-dtype = "bfloat16"\nsteps = 4\nbatch-size = 128\ndim = 8\nvocab-min = 300\n'
                   'vocab-max = 3000\neval-batches = 0\nquiet = true\ncheckpoint-every = 2\n')
    assert main(["train", "--config", str(cfg), "--store", str(store)]) == 0
    with EmbeddingStore(store, read_only=True) as st:
        assert st.tables["emb"].row_dtype is RowDtype.BFLOAT16
        keys = np.concatenate([k for k, _ in st.scan("emb")])
        w = st.read_rows("emb", keys)[0].weights
        np.testing.assert_array_equal(w.view(np.uint32) & np.uint32(0xFFFF), 0)  # bfloat16 values
    capsys.readouterr()
    assert main(["inspect", "--store", str(store)]) == 0
    assert "row_dtype bfloat16" in capsys.readouterr().out
    assert main(["train", "--config", str(cfg), "--store", str(store), "--row-dtype", "float16", "--resume"]) == 2
    assert "stored with row_dtype bfloat16, opened with float16" in capsys.readouterr().err
    assert main(["export", "--store", str(store), "--onnx", str(tmp_path / "onnx")]) == 0
    assert main(["dump", "--store", str(store), "--out", str(tmp_path / "d.bin"), "--format", "seed"]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nrow-dtype = "fp8"\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "row-dtype = 'fp8' is not one of" in capsys.readouterr().err  # the key as the file spells it


def test_packing_keeps_nan_a_nan_and_int16_refuses_what_it_cannot_hold():
    bf = RowPrecision("bfloat16")
    w = np.array([[1.0, -2.0]], np.float32)
    for bits in (0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF):  # NaNs whose payload rounding would carry
        w[0, 1] = np.array([bits], np.uint32).view(np.float32)[0]
        got = bf.unpack(bf.pack(w))
        assert got[0, 0] == 1.0 and np.isnan(got[0, 1])
    i16 = RowPrecision("int16")
    for bad in (np.nan, np.inf, 5.0):
        with pytest.raises(ValueError, match="int16 rows cannot hold"):
            i16.pack(np.array([[0.5, bad]], np.float32))
