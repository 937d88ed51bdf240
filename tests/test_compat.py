"""The seed-compatible API: scripts run unchanged, bad buffers are refused, the dump is byte-exact."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import damo_hybrid.compat as damo
from damo_hybrid.compat.seed_format import read_seed_format

SEED_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import damo_hybrid.compat as damo

    storage = damo.PyStorage(sys.argv[1], 86400 * 30)

    init_params = damo.Parameters()
    init_params.insert("name", "truncate_normal")
    init_params.insert("mean", 0.0)
    init_params.insert("stddev", 0.01)
    initializer = damo.PyInitializer(init_params)

    opt_params = damo.Parameters()
    opt_params.insert("name", "adam")
    opt_params.insert("gamma", 0.001)
    opt_params.insert("beta1", 0.9)
    opt_params.insert("beta2", 0.999)
    opt_params.insert("lambda", 0.0)
    opt_params.insert("epsilon", 1e-8)
    sched = damo.Parameters()
    sched.insert("name", "exponential_decay")
    sched.insert("decay_steps", 1000)
    sched.insert("decay_rate", 0.95)
    optimizer = damo.PyOptimizer(opt_params, sched)

    filter_params = damo.Parameters()
    filter_params.insert("capacity", 1 << 16)
    filter_params.insert("count", 2)
    filter_params.insert("fpr", 0.001)
    filter_params.insert("path", sys.argv[1] + "_cbf")
    filt = damo.PyFilter(filter_params)
    filt.add(7, 1)
    assert not filt.check(7)
    filt.add(7, 1)
    assert filt.check(7)

    dim, group = 8, 1
    emb = damo.PyEmbedding(storage, optimizer, initializer, dim, group)
    keys = np.array([1, 2, 3, 2**64 - 1], dtype=np.uint64)
    w = np.zeros(dim * keys.shape[0], dtype=np.float32)
    emb.lookup(keys, w)
    g = np.random.random(dim * keys.shape[0]).astype(np.float32)
    emb.apply_gradients(keys, g)
    emb.lookup(keys, w)

    w1 = np.zeros(10, dtype=np.float32)
    sgd = damo.Parameters()
    sgd.insert("name", "sgd")
    sgd.insert("gamma", 0.001)
    sgd.insert("lambda", 0.0)
    damo.PyOptimizer(sgd).call(w1, np.ones(10, dtype=np.float32), 0)
    damo.PyOptimizer(sgd).call(w1, np.ones(10, dtype=np.float32))

    cond = damo.Parameters()
    cond.insert("expire_days", 100)
    cond.insert("min_count", 1)
    cond.insert("group", 1)
    storage.dump(sys.argv[1] + ".dump", cond)
    storage.dump(sys.argv[1] + ".all")
    storage.checkpoint(sys.argv[1] + ".ckpt")
    storage.load_from_checkpoint(sys.argv[1] + ".ckpt")
    print(parameters_json := opt_params.to_json())
    print("OK", float(w[0]), float(w1[0]))
    """
)


def test_seed_script_runs_unchanged(tmp_path):
    script = tmp_path / "seed_script.py"
    script.write_text(SEED_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and '"gamma": 0.001' in r.stdout
    assert r.stdout.strip().endswith(str(float(np.float32(-0.002))))  # two sgd steps of 0.001
    dumped = read_seed_format(str(tmp_path / "store") + ".dump")
    assert list(dumped) == [1] and dumped[1][0].tolist() == [1, 2, 3, 2**64 - 1]


def _embedding(tmp_path, name="sgd", dim=4, group=0, st=None, **kw):
    st = st or damo.PyStorage(str(tmp_path / "s"))
    op = damo.Parameters()
    op.insert("name", name)
    for k, v in {"gamma": 0.5, **kw}.items():
        op.insert(k, v)
    ip = damo.Parameters()
    ip.insert("name", "zeros")
    return st, damo.PyEmbedding(st, damo.PyOptimizer(op), damo.PyInitializer(ip), dim, group)


def test_lookup_and_apply_in_place(tmp_path):
    st, e = _embedding(tmp_path)
    keys = np.array([5, 6], np.uint64)
    w = np.full(8, 9.0, np.float32)
    e.lookup(keys, w)
    np.testing.assert_array_equal(w, np.zeros(8))
    e.apply_gradients(keys, np.arange(8, dtype=np.float32))
    e.lookup(keys, w)
    np.testing.assert_array_equal(w, -np.float32(0.5) * np.arange(8, dtype=np.float32))


def test_a_second_embedding_of_a_group_with_another_gamma_raises_unless_allowed(tmp_path):
    from damo_hybrid.errors import ConfigConflictError

    st, e = _embedding(tmp_path)
    with pytest.raises(ConfigConflictError, match=r"table 'group_0'.*optimizer\.lr: 0\.5 -> 0\.01"):
        _embedding(tmp_path, st=st, gamma=0.01)
    keys = np.array([5], np.uint64)
    e.apply_gradients(keys, np.ones(4, np.float32))  # the first one's lr is still 0.5
    w = np.zeros(4, np.float32)
    e.lookup(keys, w)
    np.testing.assert_array_equal(w, [-0.5] * 4)
    st.close()
    st2 = damo.PyStorage(str(tmp_path / "s"), allow_config_change=True)
    _, e2 = _embedding(tmp_path, st=st2, gamma=0.01)
    assert st2.store.tables["group_0"].optimizer.lr == 0.01
    st2.close()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda e, k: e.lookup(k, np.zeros(7, np.float32)), ValueError, "w must have 8 elements"),
        (lambda e, k: e.lookup(k, np.zeros(8, np.float64)), TypeError, "w must have dtype float32"),
        (lambda e, k: e.lookup(k.astype(np.int32), np.zeros(8, np.float32)), TypeError, "keys"),
        (lambda e, k: e.lookup(k, np.zeros((2, 4), np.float32)), ValueError, "w must be 1-D"),
        (lambda e, k: e.lookup(k, [0.0] * 8), TypeError, "w must be a numpy"),
        (lambda e, k: e.apply_gradients(k, np.zeros(9, np.float32)), ValueError, "g must have 8 elements"),
        (lambda e, k: e.apply_gradients(k, np.zeros(8, np.float16)), TypeError, "g must have dtype float32"),
        (lambda e, k: e.apply_gradients(k.reshape(1, 2), np.zeros(8, np.float32)), ValueError, "keys must be 1-D"),
    ],
)
def test_wrong_buffers_raise_and_write_nothing(tmp_path, call, exc, match):
    st, e = _embedding(tmp_path)
    keys = np.array([5, 6], np.uint64)
    with pytest.raises(exc, match=match):
        call(e, keys)
    assert st.store.stats().writes == 0 and st.store.count_rows("group_0") == 0


@pytest.mark.parametrize(
    "params, exc, match",
    [
        ({"name": "adam", "gama": 0.1}, ValueError, "unknown adam optimizer parameters"),
        ({"name": "amsgrad"}, ValueError, "optimizer name"),
        ({"name": "ftrl", "gamma": 0.1, "alpha": 0.1}, ValueError, "not both"),
        ({"name": "adam", "gamma": -1.0}, ValueError, "lr must be > 0"),
    ],
)
def test_bad_optimizer_params(params, exc, match):
    p = damo.Parameters()
    for k, v in params.items():
        p.insert(k, v)
    with pytest.raises(exc, match=match):
        damo.PyOptimizer(p)


def test_group_range_and_types(tmp_path):
    st = damo.PyStorage(str(tmp_path / "s"))
    op, ip = damo.Parameters(), damo.Parameters()
    op.insert("name", "adagrad")
    ip.insert("name", "ones")
    with pytest.raises(ValueError, match=r"group must be an int in \[0, 256\)"):
        damo.PyEmbedding(st, damo.PyOptimizer(op), damo.PyInitializer(ip), 4, 256)
    with pytest.raises(TypeError, match="storage must be a PyStorage"):
        damo.PyEmbedding(None, damo.PyOptimizer(op), damo.PyInitializer(ip), 4, 0)  # type: ignore[arg-type]


def test_optimizer_call_matches_state_layout():
    p = damo.Parameters()
    p.insert("name", "adam")
    p.insert("gamma", 0.1)
    opt = damo.PyOptimizer(p)
    w = np.zeros(3 * 4, np.float32)  # weights, m, v as in the seed
    opt.call(w, np.ones(4, np.float32), 1)
    np.testing.assert_allclose(w[:4], -0.1, rtol=1e-5)
    np.testing.assert_allclose(w[4:8], 0.1, rtol=1e-6)  # m = (1 - beta1) g
    with pytest.raises(ValueError, match="w must have 12 elements"):
        opt.call(np.zeros(8, np.float32), np.ones(4, np.float32), 1)


def test_initializer_call_fills_in_place():
    p = damo.Parameters()
    p.insert("name", "random_uniform")
    p.insert("min", -2.0)
    p.insert("max", -1.0)
    w = np.zeros(1000, np.float32)
    damo.PyInitializer(p).call(w)
    assert (w >= -2).all() and (w <= -1).all() and w.std() > 0.2


def test_seed_dump_format_is_byte_exact(tmp_path):
    st, e = _embedding(tmp_path, dim=3, group=7)
    keys = np.array([10, 2**64 - 1], np.uint64)
    e.apply_gradients(keys, np.ones(6, np.float32))
    e.apply_gradients(keys[:1], np.ones(3, np.float32))
    st.dump(str(tmp_path / "d.bin"))
    data = (tmp_path / "d.bin").read_bytes()
    dims = struct.unpack("<256i", data[:1024])
    counts = struct.unpack("<256Q", data[1024:3072])
    assert dims[7] == 3 and sum(dims) == 3 and counts[7] == 2 and sum(counts) == 2
    recs = [struct.unpack("<Qi3f", data[3072 + i * 24:3072 + (i + 1) * 24]) for i in range(2)]
    assert len(data) == 3072 + 2 * 24
    assert recs[0][:2] == (10, 7) and recs[0][2:] == pytest.approx((-1.0, -1.0, -1.0))
    assert recs[1][:2] == (2**64 - 1, 7) and recs[1][2:] == pytest.approx((-0.5, -0.5, -0.5))
    cond = damo.Parameters()
    cond.insert("min_count", 2)
    st.dump(str(tmp_path / "c.bin"), cond)
    assert struct.unpack("<256Q", (tmp_path / "c.bin").read_bytes()[1024:3072])[7] == 1
    cond.insert("expire_days", 1)
    # rows were just written, so a 1-day window keeps them
    st.dump(str(tmp_path / "e.bin"), cond)
    assert read_seed_format(tmp_path / "e.bin")[7][0].tolist() == [10]


def test_load_from_checkpoint_replaces_contents(tmp_path):
    st, e = _embedding(tmp_path)
    k = np.array([1], np.uint64)
    w = np.zeros(4, np.float32)
    e.apply_gradients(k, np.ones(4, np.float32))
    st.checkpoint(str(tmp_path / "ck"))
    e.apply_gradients(k, np.ones(4, np.float32))
    st.load_from_checkpoint(str(tmp_path / "ck"))
    e.lookup(k, w)
    np.testing.assert_array_equal(w, -0.5)


def test_dump_of_a_group_without_a_table_is_empty_and_valid(tmp_path):
    st, e = _embedding(tmp_path, dim=3, group=7)
    e.apply_gradients(np.array([1], np.uint64), np.ones(3, np.float32))
    cond = damo.Parameters()
    cond.insert("group", 0)
    st.dump(str(tmp_path / "g0.bin"), cond)  # raised KeyError: 'group_0'
    assert read_seed_format(tmp_path / "g0.bin") == {}
    assert (tmp_path / "g0.bin").stat().st_size == 256 * 12


def test_storage_close_releases_the_lock(tmp_path):
    st, e = _embedding(tmp_path)
    e.apply_gradients(np.array([1], np.uint64), np.ones(4, np.float32))
    st.close()
    st.close()  # a second close is a no-op
    with damo.PyStorage(str(st.dir)) as again:  # the lock is free without waiting for garbage collection
        np.testing.assert_array_equal(again.store.lookup("group_0", np.array([1], np.uint64)), [[-0.5] * 4])
