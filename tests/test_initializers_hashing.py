from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damo_hybrid import InitializerConfig, hash_feature
from damo_hybrid.keys.hashing import fnv1a64, mix64
from damo_hybrid.rows.initializers import RowInitializer

KEYS = np.concatenate([np.array([0, 1, 2**63, 2**64 - 1], np.uint64),
                       np.random.default_rng(0).integers(0, 2**63, 20000, dtype=np.int64).view(np.uint64)])


def _init(cfg, table="t", dim=8):
    return RowInitializer(cfg, table, dim)


def test_deterministic_and_order_independent():
    init = _init(InitializerConfig.normal(std=1.0, seed=7))
    a = init(KEYS)
    perm = np.random.default_rng(1).permutation(len(KEYS))
    np.testing.assert_array_equal(init(KEYS[perm]), a[perm])
    np.testing.assert_array_equal(init(KEYS[:3]), a[:3])


def test_same_rows_in_another_process():
    cfgs = {"normal": InitializerConfig.normal(0.1, 0.3, seed=5), "truncated": InitializerConfig.truncated_normal(std=1.0),
            "uniform": InitializerConfig.uniform(-2, 3), "xavier": InitializerConfig.xavier_uniform(seed=9)}
    code = (
        "import json,sys,numpy as np\n"
        "from damo_hybrid import InitializerConfig\n"
        "from damo_hybrid.rows.initializers import RowInitializer\n"
        "k=np.array(json.loads(sys.argv[1]),dtype=np.uint64)\n"
        "cfgs={'normal':InitializerConfig.normal(0.1,0.3,seed=5),'truncated':InitializerConfig.truncated_normal(std=1.0),"
        "'uniform':InitializerConfig.uniform(-2,3),'xavier':InitializerConfig.xavier_uniform(seed=9)}\n"
        "print(json.dumps({n:RowInitializer(c,'tbl',6)(k).tobytes().hex() for n,c in cfgs.items()}))\n"
    )
    keys = KEYS[:200]
    out = subprocess.run([sys.executable, "-c", code, json.dumps([int(k) for k in keys])],
                         capture_output=True, text=True, check=True)
    other = json.loads(out.stdout)
    for n, c in cfgs.items():
        assert RowInitializer(c, "tbl", 6)(keys).tobytes().hex() == other[n], n


def test_seed_and_table_change_rows():
    a = _init(InitializerConfig.normal(seed=1))(KEYS[:10])
    assert not np.array_equal(a, _init(InitializerConfig.normal(seed=2))(KEYS[:10]))
    assert not np.array_equal(a, _init(InitializerConfig.normal(seed=1), table="u")(KEYS[:10]))


def test_distributions():
    n = _init(InitializerConfig.normal(mean=1.0, std=2.0), dim=16)(KEYS)
    assert abs(n.mean() - 1.0) < 0.02 and abs(n.std() - 2.0) < 0.02
    t = _init(InitializerConfig.truncated_normal(mean=0.0, std=1.0), dim=16)(KEYS)
    assert np.abs(t).max() <= 2.0 and abs(t.std() - 0.88) < 0.02  # std of N(0,1) cut at 2 sigma
    u = _init(InitializerConfig.uniform(-3, 5), dim=16)(KEYS)
    assert u.min() >= -3 and u.max() <= 5 and abs(u.mean() - 1.0) < 0.03
    x = _init(InitializerConfig.xavier_uniform(), dim=23)(KEYS)
    assert np.abs(x).max() <= np.sqrt(6 / 24) and np.abs(x).max() > 0.95 * np.sqrt(6 / 24)
    assert (_init(InitializerConfig.zeros())(KEYS[:5]) == 0).all()
    assert (_init(InitializerConfig.ones())(KEYS[:5]) == 1).all()
    assert n.dtype == np.float32 and n.shape == (len(KEYS), 16)


def test_columns_are_uncorrelated():
    n = _init(InitializerConfig.normal(std=1.0), dim=4)(KEYS)
    c = np.corrcoef(n.T)
    assert np.abs(c - np.eye(4)).max() < 0.05


def test_hash_feature_known_values_are_stable():
    # These values are part of the on-disk contract; they must never change.
    assert fnv1a64([b""])[0] == 0xCBF29CE484222325
    assert fnv1a64([b"a"])[0] == 0xAF63DC4C8601EC8C
    assert mix64(np.array([0], np.uint64))[0] == 0
    k = hash_feature("C1", ["68fd1e64", "", "x"])
    again = hash_feature("C1", np.array(["68fd1e64", "", "x"]))
    np.testing.assert_array_equal(k, again)
    assert len(set(k.tolist())) == 3


def test_hash_feature_types_and_fields_separate():
    assert hash_feature("f", [5])[0] != hash_feature("f", ["5"])[0]
    assert hash_feature("f", [5])[0] != hash_feature("g", [5])[0]
    assert hash_feature(3, [5])[0] == hash_feature("3", [5])[0]
    np.testing.assert_array_equal(hash_feature("f", [b"ab\x00"]), hash_feature("f", [bytearray(b"ab\x00")]))
    assert hash_feature("f", [b"ab\x00"])[0] != hash_feature("f", [b"ab"])[0]
    np.testing.assert_array_equal(hash_feature("f", [-1, 2**63]), hash_feature("f", np.array([-1, -(2**63)], np.int64)))
    np.testing.assert_array_equal(hash_feature("f", [2**64 - 1]), hash_feature("f", [-1]))


def test_hash_feature_in_another_process():
    code = ("from damo_hybrid import hash_feature;"
            "print(list(map(int, hash_feature('site', ['a', 'bcd', 'é']))), list(map(int, hash_feature(2, [1, -5]))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"{list(map(int, hash_feature('site', ['a', 'bcd', 'é'])))} {list(map(int, hash_feature(2, [1, -5])))}"


def test_variable_length_strings_vectorized_equals_one_by_one():
    vals = ["", "a", "abc", "long string " * 10, "ü", "a"]
    together = hash_feature("f", vals)
    single = np.array([hash_feature("f", [v])[0] for v in vals], np.uint64)
    np.testing.assert_array_equal(together, single)
    assert together[1] == together[5]


@pytest.mark.parametrize("bad", [[1.5], [object()], [True]])
def test_hash_feature_rejects_other_types(bad):
    with pytest.raises(TypeError):
        hash_feature("f", bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=300), st.integers(1, 8))
def test_unique_inverse_equals_numpy_unique(values, repeat):
    from damo_hybrid.keys.kernels import unique_inverse

    keys = np.array(values * repeat, dtype=np.uint64)
    np.random.default_rng(len(values)).shuffle(keys)
    want_u, want_inv = np.unique(keys, return_inverse=True)
    got_u, got_inv = unique_inverse(keys)
    assert got_u.dtype == np.uint64 and got_inv.dtype == np.int64
    np.testing.assert_array_equal(got_u, want_u)
    np.testing.assert_array_equal(got_inv, want_inv.reshape(-1))


def _reference_rows(cfg: InitializerConfig, table: str, dim: int, keys: np.ndarray) -> np.ndarray:
    """The module doc's algorithm in numpy, a pass per column (the compiled loops' reference)."""
    import math

    golden, inv24 = np.uint64(0x9E3779B97F4A7C15), 1.0 / (1 << 24)
    salt = mix64(np.uint64(cfg.seed) ^ fnv1a64([table.encode()])[0])[0]
    base = mix64(keys ^ salt)

    def bits(first: int) -> np.ndarray:
        return mix64(base[:, None] + np.arange(first + 1, first + dim + 1, dtype=np.uint64)[None, :] * golden)

    def normal(first: int) -> np.ndarray:
        b = bits(first)
        u1 = ((b >> np.uint64(40)).astype(np.float64) + 0.5) * inv24
        u2 = (((b >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float64) + 0.5) * inv24
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)

    kind = cfg.kind.value
    if kind in ("uniform", "xavier_uniform"):
        u = ((bits(0) >> np.uint64(40)).astype(np.float64) + 0.5) * inv24
        if kind == "uniform":
            return (float(cfg.low) + (float(cfg.high) - float(cfg.low)) * u).astype(np.float32)
        b = math.sqrt(6.0 / (1.0 + dim))
        return (-b + 2.0 * b * u).astype(np.float32)
    z = normal(0)
    if kind != "normal":
        for r in range(1, 8):
            bad = np.abs(z) > 2.0
            z = np.where(bad, normal(dim * r), z)
        z = np.clip(z, -2.0, 2.0)
    return (float(cfg.mean) + float(cfg.std) * z).astype(np.float32)


@pytest.mark.parametrize("cfg", [InitializerConfig.normal(std=0.01), InitializerConfig.normal(mean=0.5, std=2.0, seed=3),
                                 InitializerConfig.truncated_normal(std=0.05), InitializerConfig.uniform(-0.2, 0.3),
                                 InitializerConfig.xavier_uniform()])
def test_compiled_rows_equal_the_documented_algorithm(cfg):
    keys = np.random.default_rng(5).integers(0, 2**64, 20_000, dtype=np.uint64)
    for dim in (1, 16, 17):
        got = RowInitializer(cfg, "emb", dim)(keys)
        np.testing.assert_array_equal(got.view(np.uint32), _reference_rows(cfg, "emb", dim, keys).view(np.uint32))
