"""The device tier: exact against the plain host-cache reference, exclusive tiers, no lost rows.

The tier's logic (slots, pins of batches t and t+1, LRU eviction, dirty rows sent down into
the host cache, the fused step) runs on the CPU device in every CI run; the same tests on
``cuda`` run where a GPU and CuPy are present and skip cleanly elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.data.synthetic import SyntheticCriteo
from damo_hybrid.errors import NonFiniteGradientError
from damo_hybrid.models import DeepFM
from damo_hybrid.nn import EmbeddingCollection, Feature
from damo_hybrid.ops import cuda_available
from damo_hybrid.trainer import Trainer

STEPS = 25


def _tables(opt, row_dtype="float32"):
    return [TableConfig("emb", 8, initializer=InitializerConfig.normal(std=0.05, seed=2), optimizer=opt,
                        row_dtype=row_dtype),
            TableConfig("lin", 1, initializer=InitializerConfig.zeros(), optimizer=opt, row_dtype=row_dtype)]


def _train(path, prefetch, opt, backend="cpu", device_cache_mb=None, checkpoint_dir=None, row_dtype="float32"):
    torch.manual_seed(0)
    data = SyntheticCriteo(256, seed=1, vocab_min=500, vocab_max=8000, n_sparse=6, n_dense=3)
    store = EmbeddingStore(path, _tables(opt, row_dtype))
    # 2,500 rows per table and tier, far fewer than the keys the run touches: both tiers evict
    model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=2500,
                   backend=backend, device_cache_mb=device_cache_mb)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), data.batch)
    # checkpoints flush the tiers mid-run: rows are then clean on the device and dirty in the host cache
    trainer.fit(STEPS, prefetch=prefetch, checkpoint_every=8 if checkpoint_dir else 0, checkpoint_dir=checkpoint_dir)
    model.sparse.flush()
    return store, model


def _rows(store, table):
    keys = np.concatenate([k for k, _ in store.scan(table)])
    rows, found = store.read_rows(table, keys)
    assert found.all()
    return keys, rows


def _close(a, b, tol, msg=""):
    """Bit equality on the CPU (tol 0), allclose for a CUDA twin."""
    if tol == 0:
        np.testing.assert_array_equal(a, b, err_msg=msg)
    else:
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=msg)


def _assert_same_run(s1, m1, s2, m2, tol):
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2
        _close(p1.cpu().numpy(), p2.cpu().numpy(), tol, n1)
    for table in ("emb", "lin"):
        k1, r1 = _rows(s1, table)
        k2, r2 = _rows(s2, table)
        np.testing.assert_array_equal(k1, k2)
        _close(r1.weights, r2.weights, tol)
        _close(r1.state, r2.state, tol)
        np.testing.assert_array_equal(r1.count, r2.count)
        assert s1.step(table) == s2.step(table) == STEPS
        # the running row count survived rows moving up and down the tiers
        assert s2.stats().table_rows[table] == s2.count_rows(table) == len(k2)


def _check_pipelined_device_run(tmp_path, opt, backend, tol, row_dtype="float32"):
    # the reference: host cache only, sequential
    s1, m1 = _train(tmp_path / "seq", prefetch=False, opt=opt, row_dtype=row_dtype)
    s2, m2 = _train(tmp_path / "dev", prefetch=True, opt=opt, backend=backend, device_cache_mb=1e-9,
                    checkpoint_dir=tmp_path / "ckpt", row_dtype=row_dtype)
    try:
        dstats = m2.sparse.device_cache_stats()
        assert set(dstats) == {"emb", "lin"}
        assert all(s.evictions > 0 and s.write_backs > 0 for s in dstats.values()), "the test must force device evictions"
        assert sum(s.evictions for s in m2.sparse.cache_stats().values()) > 0, "and host evictions"
        assert all((c.slots.pins == 0).all() for c in m2.sparse.device_caches.values())
        _assert_same_run(s1, m1, s2, m2, tol)
    finally:
        s1.close()
        s2.close()


OPTS = [OptimizerConfig.adagrad(0.05), OptimizerConfig.adam(0.01), OptimizerConfig.ftrl(0.05)]


@pytest.mark.parametrize("opt", OPTS, ids=["adagrad", "adam", "ftrl"])
def test_pipelined_device_tier_equals_sequential_host_reference(tmp_path, opt):
    _check_pipelined_device_run(tmp_path, opt, "cpu", 0)  # bit for bit


@pytest.mark.requires_cuda
@pytest.mark.parametrize("opt", OPTS, ids=["adagrad", "adam", "ftrl"])
def test_pipelined_gpu_run_equals_cpu_sequential_reference(tmp_path, opt):
    _check_pipelined_device_run(tmp_path, opt, "cuda", 1e-5)


@pytest.mark.parametrize("row_dtype", ["float16", "bfloat16", "int16"])
def test_16_bit_rows_pipelined_device_tier_equal_the_sequential_host_reference(tmp_path, row_dtype):
    """The device tier rounds with the torch twin of the host tier's numpy rounding: bit for bit."""
    _check_pipelined_device_run(tmp_path, OptimizerConfig.adam(0.01), "cpu", 0, row_dtype)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("row_dtype", ["float16", "bfloat16", "int16"])
def test_16_bit_rows_on_the_gpu_stay_within_a_grid_step_of_the_cpu_reference(tmp_path, row_dtype):
    # the fused kernel's float32 results may differ from numpy's in the last bit, and a rounding
    # then lands on the neighbouring grid value: one bfloat16 step is 2**-8 relative
    _check_pipelined_device_run(tmp_path, OptimizerConfig.adam(0.01), "cuda", 2e-2, row_dtype)


# --------------------------------------------------------------- tiers


def _host(store, table="emb", capacity=64):
    return store.cache_table(table, capacity).host


def test_take_rows_moves_rows_up_and_put_rows_brings_them_back(tmp_path):
    with EmbeddingStore(tmp_path / "s", _tables(OptimizerConfig.adagrad(0.1))) as st:
        st.apply_gradients("emb", np.arange(4, dtype=np.uint64), np.ones((4, 8), np.float32))  # keys 0..3 stored
        host = _host(st)
        host.make_resident(np.array([2, 3, 10], np.uint64))
        st.apply_gradients("emb", np.array([2, 3, 10], np.uint64), np.ones((3, 8), np.float32))  # 2, 3, 10 dirty here
        want, _ = st.read_rows("emb", np.arange(4, dtype=np.uint64))
        rows, stored, dirty = host.take_rows(np.array([0, 2, 10, 99], np.uint64))
        np.testing.assert_array_equal(stored, [True, True, False, False])
        np.testing.assert_array_equal(dirty, [False, True, True, False])
        np.testing.assert_array_equal(rows.weights[0], want.weights[0])
        np.testing.assert_array_equal(rows.count, [1, 2, 1, 0])
        assert len(host) == 1  # 2 and 10 left the host cache; 3 stays; 0 and 99 were never resident
        rows.weights += 1.0
        host.put_rows(np.array([0, 2, 10, 99], np.uint64), rows, stored)
        st.flush()
        got, found = st.read_rows("emb", np.array([0, 2, 10, 99], np.uint64))
        assert found.all()
        np.testing.assert_array_equal(got.weights, rows.weights)
        assert st.stats().table_rows["emb"] == st.count_rows("emb") == 6


def test_device_cache_flush_keeps_rows_resident_and_writes_them(tmp_path):
    with EmbeddingStore(tmp_path / "s", _tables(OptimizerConfig.sgd(0.5))) as st:
        emb = EmbeddingCollection(st, [Feature("x", "emb")], cache_mb=1, backend="cpu", device_cache_mb=1)
        keys = np.array([5, 7, 5], np.uint64)
        out = emb({"x": keys})["x"]
        out.sum().backward()
        emb.apply_gradients()
        emb.flush()
        dc = emb.device_caches["emb"]
        assert len(dc) == 2 and not dc.dirty.any()
        got, found = st.read_rows("emb", np.array([5, 7], np.uint64))
        assert found.all()
        init = out.detach().numpy()[[0, 1]]
        np.testing.assert_allclose(got.weights, init - 0.5 * np.array([[2.0], [1.0]], np.float32), rtol=1e-6)
        np.testing.assert_array_equal(got.count, [1, 1])


def test_device_tier_too_small_for_a_batch_is_a_clear_error_and_loses_nothing(tmp_path):
    with EmbeddingStore(tmp_path / "s", _tables(OptimizerConfig.sgd(0.5))) as st:
        emb = EmbeddingCollection(st, [Feature("x", "emb")], cache_mb=1, min_cache_rows=4, backend="cpu",
                                  device_cache_mb=1e-9)
        first = emb.prepare({"x": np.arange(4, dtype=np.uint64)})  # pins all 4 device slots
        with pytest.raises(RuntimeError, match="device cache of table 'emb' cannot free"):
            emb.prepare({"x": np.arange(10, 13, dtype=np.uint64)})
        emb.release(first)
        out = emb({"x": np.arange(10, 13, dtype=np.uint64)})["x"]
        out.sum().backward()
        emb.apply_gradients()
        emb.flush()
        assert st.count_rows("emb") == 3


def test_nonfinite_gradient_on_the_device_tier_raises_and_writes_nothing(tmp_path):
    with EmbeddingStore(tmp_path / "s", _tables(OptimizerConfig.sgd(0.5))) as st:
        emb = EmbeddingCollection(st, [Feature("x", "emb")], cache_mb=1, backend="cpu", device_cache_mb=1)
        out = emb({"x": np.array([1, 2], np.uint64)})["x"]
        (out * torch.tensor([[float("nan")], [1.0]])).sum().backward()
        with pytest.raises(NonFiniteGradientError, match="nothing was written"):
            emb.apply_gradients()
        emb.flush()
        assert st.count_rows("emb") == 0 and st.step("emb") == 0
        assert all((c.slots.pins == 0).all() for c in emb.device_caches.values())


def test_nonfinite_gradient_skip_policy_on_the_device_tier(tmp_path):
    t = TableConfig("emb", 8, optimizer=OptimizerConfig.sgd(0.5), nonfinite="skip")
    with EmbeddingStore(tmp_path / "s", [t]) as st:
        emb = EmbeddingCollection(st, [Feature("x", "emb")], cache_mb=1, backend="cpu", device_cache_mb=1)
        out = emb({"x": np.array([1, 2], np.uint64)})["x"]
        (out * torch.tensor([[float("inf")], [1.0]])).sum().backward()
        emb.apply_gradients()
        emb.flush()
        _, found = st.read_rows("emb", np.array([1, 2], np.uint64))
        np.testing.assert_array_equal(found, [False, True])  # row 1 was skipped, row 2 stepped
        assert st.stats().dropped_nonfinite == 1


def test_backend_choice(tmp_path):
    with EmbeddingStore(tmp_path / "s", _tables(OptimizerConfig.sgd(0.5))) as st:
        emb = EmbeddingCollection(st, [Feature("x", "emb")], cache_mb=1, backend="auto")
        assert emb.device.type == ("cuda" if cuda_available() else "cpu")
        assert bool(emb.device_caches) == cuda_available()  # auto on a CPU machine: the host path only
        if not cuda_available():
            with pytest.raises(ValueError, match="CUDA is unavailable"):
                EmbeddingCollection(st, [Feature("x", "emb")], cache_mb=1, backend="cuda")
        with pytest.raises(ValueError, match="device_cache_mb"):
            EmbeddingCollection(st, [Feature("x", "emb")], cache_mb=1, backend="cpu", device_cache_mb=0)
        with pytest.raises(ValueError, match="backend"):
            EmbeddingCollection(st, [Feature("x", "emb")], cache_mb=1, backend="tpu")


# ------------------------------------------------- device ops vs CPU twins


@pytest.mark.requires_cuda
@pytest.mark.parametrize("opt", [OptimizerConfig.adagrad(0.05), OptimizerConfig.adam(0.01), OptimizerConfig.lion(0.01),
                                 OptimizerConfig.ftrl(0.05), OptimizerConfig.sgd(0.1)],
                         ids=["adagrad", "adam", "lion", "ftrl", "sgd"])
def test_device_cache_step_matches_cpu_twin(tmp_path, opt):
    """Gather, fused step and scatter on CUDA against the same on the CPU device."""
    rng = np.random.default_rng(0)
    keys = rng.choice(np.arange(1, 10_000, dtype=np.uint64), 3000, replace=False)
    g = rng.normal(size=(3000, 8)).astype(np.float32)
    out = {}
    for dev in ("cpu", "cuda"):
        with EmbeddingStore(tmp_path / dev, _tables(opt)) as st:
            dc = st.cache_table("emb", 4096, 4096, dev).device
            table = st.table("emb")
            for _ in range(3):
                b = dc.prepare(keys, {})
                dc.gather(b)
                dc.commit(b, *dc.stage(b, torch.from_numpy(g).to(dc.device), table.lr()))
                dc.release(b)
                table.advance()
            torch.cuda.synchronize()
            rows = dc.peek(keys)[0]
            out[dev] = (rows.weights, rows.state)
    np.testing.assert_allclose(out["cuda"][0], out["cpu"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["cuda"][1], out["cpu"][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ benchmark


def test_gpu_benchmark_runs_all_three_sides(tmp_path):
    """The GPU benchmark's code path end to end (on the CPU device where there is no GPU)."""
    from damo_hybrid.bench.gpu import run_gpu_bench

    res = run_gpu_bench(models=("deepfm", "dlrm"), rows=20_000, batch_sizes=(512,), steps=6, warmup=2,
                        root=tmp_path, log_fn=lambda s: None)
    assert [r["model"] for r in res["runs"]] == ["deepfm", "dlrm"]
    for r in res["runs"]:
        assert all(r[s]["samples_per_s"] > 0 for s in ("hbm", "device", "cpu"))
        assert r["device_vs_hbm"] == pytest.approx(r["device"]["samples_per_s"] / r["hbm"]["samples_per_s"])
        assert r["device"]["device_cache_rows"] and r["cpu"]["device_cache_rows"] is None
        assert {st for st, _, _ in r["device"]["timeline"]} >= {"prepare", "compute", "apply"}
        assert r["device"]["pipeline"]["batches"] == 6
    with pytest.raises(ValueError, match="sides"):
        run_gpu_bench(sides=("tpu",))


@pytest.mark.skipif(cuda_available(), reason="checks the error given where CUDA is absent")
def test_cli_asks_for_cuda_without_it(capsys, tmp_path):
    from damo_hybrid.cli import main

    args = ["train", "--steps", "1", "--batch-size", "64", "--quiet", "--store", str(tmp_path / "s")]
    assert main([*args, "--backend", "cuda"]) == 2
    assert "CUDA is unavailable" in capsys.readouterr().err
    assert main([*args, "--device-cache-mb", "64"]) == 2
    assert "needs the cuda backend" in capsys.readouterr().err
