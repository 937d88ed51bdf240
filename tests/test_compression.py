"""Compressed tables (quotient-remainder, binary code, hashing trick): the key transforms against
bit-by-bit references, the combined rows and their training against a dense implementation of
each paper's formula, and the pipeline, checkpoints and config checks unchanged by them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from damo_hybrid import (
    CompressionConfig,
    EmbeddingStore,
    InitializerConfig,
    OptimizerConfig,
    TableConfig,
)
from damo_hybrid.errors import ConfigConflictError
from damo_hybrid.keys.compression import PART_SHIFT
from damo_hybrid.nn import EmbeddingCollection, Feature

RNG = np.random.default_rng(0)


def test_qr_partitions_are_the_mixed_radix_digits_and_complementary():
    for rows, m, k in [(1000, 40, 2), (1000, 7, 3), (97, 10, 2), (5000, 9, 4)]:
        c = CompressionConfig.qr(rows, m, partitions=k)
        ids = np.arange(rows, dtype=np.uint64)
        sub = c.subkeys(ids + np.uint64(rows) * np.uint64(3))  # raw keys reduce mod rows first
        assert sub.shape == (rows, k) and sub.dtype == np.uint64
        parts = (sub >> np.uint64(PART_SHIFT)).astype(int)
        idx = (sub & np.uint64((1 << PART_SHIFT) - 1)).astype(int)
        assert (parts == np.arange(k)).all()
        for i in (0, 1, rows // 2, rows - 1):  # the digits, written out one by one
            want, x = [], i
            for _ in range(k - 1):
                want.append(x % m)
                x //= m
            want.append(x)
            assert idx[i].tolist() == want
        assert (idx < np.array(c.sizes)).all()  # every index inside its partition
        assert len({tuple(r) for r in idx.tolist()}) == rows  # complementary: a unique combination per id
        assert c.stored_rows == sum(c.sizes) < rows


def test_binary_code_bits_are_exact_for_any_id_space():
    for rows, bits in [(2, 1), (1000, 10), (1024, 10), (1025, 11), (2**53 + 1, 54), (2**56, 56)]:
        assert CompressionConfig.binary_code(rows, 1).code_bits == bits  # ids 0 .. rows - 1


def test_binary_code_blocks_match_a_bit_by_bit_reference():
    c = CompressionConfig.binary_code(10**6, 3)
    assert c.code_bits == 20 and c.parts == 7 and c.sizes == (8,) * 6 + (4,)
    keys = RNG.integers(0, 2**63, 500, dtype=np.uint64)
    sub = c.subkeys(keys)
    for key, row in zip(keys.tolist(), sub.tolist()):
        bits = [(key % 10**6 >> b) & 1 for b in range(20)]  # least significant first
        for p, s in enumerate(row):
            block = bits[3 * p:3 * p + 3]
            assert s >> PART_SHIFT == p
            assert s & ((1 << PART_SHIFT) - 1) == sum(bit << j for j, bit in enumerate(block))


@pytest.mark.parametrize("bad, match", [
    (lambda: CompressionConfig.qr(1000, 40, op="concat2"), "combines its partitions"),
    (lambda: CompressionConfig.qr(1000, 40, partitions=1), "2 <= partitions"),
    (lambda: CompressionConfig.qr(1000, 32, partitions=3), "m\\*\\*\\(partitions - 1\\) < rows"),
    (lambda: CompressionConfig.binary_code(1000, 11), "bits_per_block"),
    (lambda: CompressionConfig.hashing(1), "rows must be in"),
    (lambda: CompressionConfig("hashing", 100, m=3), "hashing does not take \\['m'\\]"),
    (lambda: CompressionConfig("qr", 1000, op="mult", m=40, partitions=2, bits_per_block=5), "does not take"),
    (lambda: CompressionConfig.parse("qr:rows=100,m=2,partitions=1000000000"), "partitions <= 255"),
    (lambda: CompressionConfig.parse("qr:rows=1000,m=40,m=50"), "given twice"),
])
def test_bad_compression_configs_say_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


CASES = [CompressionConfig.qr(600, 25, "mult"), CompressionConfig.qr(600, 25, "add"),
         CompressionConfig.qr(600, 9, "concat", partitions=3), CompressionConfig.binary_code(600, 3, "sum"),
         CompressionConfig.binary_code(600, 4, "mean"), CompressionConfig.binary_code(600, 5, "concat"),
         CompressionConfig.hashing(100)]


def _reference(c: CompressionConfig, tables: list[torch.Tensor], ids: np.ndarray, linear: bool) -> torch.Tensor:
    """The paper's formula on dense per-partition tables (written without the store's transform)."""
    i = torch.from_numpy((ids % np.uint64(c.rows)).astype(np.int64))
    vecs = []
    for p, t in enumerate(tables):
        if c.kind.value == "qr":
            j = i // c.m ** p if p == len(tables) - 1 else (i // c.m ** p) % c.m
        elif c.kind.value == "binary_code":
            j = (i >> (p * c.bits_per_block)) & ((1 << c.bits_per_block) - 1)
        else:
            j = i
        vecs.append(t[j])
    x = torch.stack(vecs, 1)  # (N, P, W)
    lin = (x[..., -1].mean(1, keepdim=True) if c.op == "mean" else x[..., -1].sum(1, keepdim=True)) if linear else None
    e = x[..., :-1] if linear else x
    out = {"mult": lambda: e.prod(1), "add": lambda: e.sum(1), "sum": lambda: e.sum(1), "mean": lambda: e.mean(1),
           "concat": lambda: e.reshape(len(e), -1)}[c.op]()
    return out if lin is None else torch.cat([out, lin], 1)


@pytest.mark.parametrize("linear", [False, True], ids=["plain", "linear_column"])
@pytest.mark.parametrize("c", CASES, ids=lambda c: f"{c.kind.value}-{c.op}")
def test_combined_rows_and_their_training_equal_the_dense_formula(tmp_path, c, linear):
    dim, lr = 5, 0.1
    cfg = TableConfig("t", dim, initializer=InitializerConfig.normal(std=0.5, seed=3), optimizer=OptimizerConfig.sgd(lr),
                      linear_column=linear, compression=c)
    ids = RNG.integers(0, 2**63, 64, dtype=np.uint64)
    bag_vals = RNG.integers(0, 2**63, 150, dtype=np.uint64)
    bag_offs = np.concatenate([[0], np.sort(RNG.integers(0, 150, 63)), [150]])  # 64 bags, some empty
    with EmbeddingStore(tmp_path / "s", [cfg]) as st:
        # the dense reference starts from the store's initial rows of every partition
        dense = [torch.from_numpy(st.lookup("t", np.arange(n, dtype=np.uint64) | np.uint64(p << PART_SHIFT))).clone()
                 .requires_grad_(True) for p, n in enumerate(c.sizes)]
        coll = EmbeddingCollection(st, [Feature("f", "t"), Feature("g", "t", pooling="mean")], backend="cpu")
        assert coll.dims["f"] == c.out_dim(dim, linear)
        for step in range(3):
            out = coll({"f": ids, "g": (bag_vals, bag_offs)})
            ref_f = _reference(c, dense, ids, linear)
            vals = _reference(c, dense, bag_vals, linear)
            ref_g = torch.stack([vals[a:b].mean(0) if b > a else vals.new_zeros(vals.shape[1])
                                 for a, b in zip(bag_offs[:-1], bag_offs[1:])])
            torch.testing.assert_close(out["f"], ref_f, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out["g"], ref_g, rtol=1e-5, atol=1e-6)
            w = torch.linspace(-1, 1, ref_f.shape[1])
            loss = ((out["f"] * w).sum(1) ** 2).mean() + (out["g"] * w).sum()
            ref_loss = ((ref_f * w).sum(1) ** 2).mean() + (ref_g * w).sum()
            loss.backward()
            coll.apply_gradients()
            opt = torch.optim.SGD(dense, lr=lr)
            opt.zero_grad()
            ref_loss.backward()
            opt.step()
        for p, n in enumerate(c.sizes):  # every partition's rows after three steps
            got = st.lookup("t", np.arange(n, dtype=np.uint64) | np.uint64(p << PART_SHIFT))
            np.testing.assert_allclose(got, dense[p].detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c", [CompressionConfig.qr(10**7, 3000), CompressionConfig.double_hash(2000, 2)],
                         ids=["qr", "double_hash"])
def test_pipelined_equals_sequential_with_a_compressed_table_and_evictions(tmp_path, c):
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.models import DeepFM
    from damo_hybrid.trainer import Trainer

    def run(path, prefetch):
        torch.manual_seed(0)
        data = SyntheticCriteo(64, seed=1, vocab_min=200, vocab_max=2000, n_sparse=6, n_dense=3)
        cfg = TableConfig("emb", 9, initializer=InitializerConfig.normal(std=0.3, seed=2),
                          optimizer=OptimizerConfig.adagrad(0.05), linear_column=True, compression=c)
        store = EmbeddingStore(path, [cfg])
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=2000, backend="cpu")
        Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), data.batch).fit(25, prefetch=prefetch)
        return store, model

    (s1, m1), (s2, m2) = run(tmp_path / "seq", False), run(tmp_path / "pipe", True)
    try:
        assert sum(c.stats.evictions for c in m2.sparse.caches.values()) > 0, "the test must force evictions"
        for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
            np.testing.assert_array_equal(p1.numpy(), p2.numpy(), err_msg=n1)
        k1, k2 = (np.concatenate([k for k, _ in s.scan("emb")]) for s in (s1, s2))
        np.testing.assert_array_equal(k1, k2)
        parts = set((k1 >> np.uint64(PART_SHIFT)).tolist())
        assert parts == ({0, 1} if c.kind.value == "qr" else {0, 1, 2})  # partition keys only (0: own rows)
        r1, r2 = s1.read_rows("emb", k1)[0], s2.read_rows("emb", k2)[0]
        np.testing.assert_array_equal(r1.weights, r2.weights)
        np.testing.assert_array_equal(r1.state, r2.state)
    finally:
        s1.close()
        s2.close()


def test_compression_is_stored_checkpointed_and_fixed(tmp_path):
    c = CompressionConfig.binary_code(10**5, 4)
    cfg = TableConfig("t", 4, compression=c)
    with EmbeddingStore(tmp_path / "s", [cfg]) as st:
        coll = EmbeddingCollection(st, [Feature("f", "t")], backend="cpu")
        keys = RNG.integers(0, 2**63, 32, dtype=np.uint64)
        coll({"f": keys})["f"].sum().backward()
        coll.apply_gradients()
        st.checkpoint(tmp_path / "ck")
        want = coll.eval()({"f": keys})["f"]
    with EmbeddingStore.from_checkpoint(tmp_path / "ck", tmp_path / "r") as r:  # the stored config, compression included
        assert r.tables["t"].compression == c
        got = EmbeddingCollection(r, [Feature("f", "t")], backend="cpu").eval()({"f": keys})["f"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    other = TableConfig("t", 4, compression=CompressionConfig.binary_code(10**5, 5))
    for changed in (other, TableConfig("t", 4)):
        with pytest.raises(ConfigConflictError, match="compression"):
            EmbeddingStore(tmp_path / "s", [changed])


def test_train_inspect_and_refusals_from_the_command_line(tmp_path, capsys):
    from damo_hybrid.cli import main

    store = tmp_path / "s"
    argv = ["train", "--steps", "6", "--batch-size", "128", "--dim", "8", "--vocab-min", "300", "--vocab-max", "3000",
            "--eval-batches", "0", "--quiet", "--store", str(store), "--checkpoint-every", "3"]
    assert main(argv + ["--table-compression", "qr:rows=1000000,m=1000,op=concat,partitions=2"]) == 0
    with EmbeddingStore(store, read_only=True) as st:
        cfg = st.tables["emb"]
        assert cfg.compression == CompressionConfig.qr(10**6, 1000, "concat") and cfg.dim == 8 // 2 + 1
        keys = np.concatenate([k for k, _ in st.scan("emb")])
        assert len(keys) > 0 and set((keys >> np.uint64(PART_SHIFT)).tolist()) == {0, 1}
    mult = tmp_path / "mult"
    assert main(argv[:-4] + ["--store", str(mult), "--table-compression", "qr:rows=1000000,m=1000"]) == 0
    with EmbeddingStore(mult, read_only=True) as st:  # a product of 2 rows starts at a plain row's spread
        assert st.tables["emb"].initializer.std == pytest.approx(0.1)
    capsys.readouterr()
    assert main(["inspect", "--store", str(store)]) == 0
    assert "compression qr(m=1000, partitions=2, op=concat) of 1,000,000 ids" in capsys.readouterr().out
    assert CompressionConfig.parse("double_hash:rows=5000,min_count=3") == CompressionConfig.double_hash(5000, 3)
    for bad, msg in [("qr:rows=1000000", "lacks m="), ("double_hash:rows=10", "lacks min_count="), ("qr:rows=10,m=x", "must be an integer"),
                     ("lsh:rows=10", "unknown compression 'lsh'"), ("qr:rows=1000000,m=100,op=concat,partitions=3",
                                                                   "multiple of the 3 partitions")]:
        assert main(argv[:-4] + ["--store", str(tmp_path / "bad"), "--table-compression", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert main(["dump", "--store", str(store), "--out", str(tmp_path / "d.bin"), "--format", "seed"]) == 2
    assert "cannot represent" in capsys.readouterr().err
    assert main(["export", "--store", str(store), "--onnx", str(tmp_path / "onnx")]) == 0  # checked in test_serving
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["compression"]["op"] == "concat"


def test_the_study_picks_the_most_rows_within_each_ratio_and_reports_the_goals():
    from damo_hybrid.bench.compression import pick_config, run_compression_study

    for method in ("qr_mult", "qr_concat", "binary_code"):
        for ratio in (10, 100, 1000):
            c = pick_config(method, 100_000, ratio, 16)
            assert c is not None and c.stored_rows <= 100_000 / ratio
            assert c.stored_rows >= 0.5 * 100_000 / ratio  # not far below: a fair comparison at that size
            assert c.op != "concat" or 16 % c.parts == 0
    assert pick_config("hashing", 100_000, 100, 16) == CompressionConfig.hashing(1000)
    assert pick_config("qr_mult", 3000, 1000, 16) is None  # 3 rows: no two partitions fit
    res = run_compression_study("unused", datasets=("synthetic",), seeds=(0,), ratios=(10,),
                                methods=("hashing", "qr_mult", "double_hash", "dhe", "float16"), hidden=(16,),
                                synthetic_batches=6, synthetic_batch_size=256, log_fn=lambda s: None)
    d = res["datasets"]["synthetic"]
    full, f16, hashing, qr, dh, dhe = d["runs"]
    assert [r["method"] for r in d["runs"]] == ["full", "float16", "hashing", "qr_mult", "double_hash", "dhe"]
    assert f16["rows"] == full["rows"] and f16["weight_bytes"] * 2 == full["weight_bytes"]
    assert f16["bytes"] == full["rows"] * (2 + 4) * 17  # 16-bit weights, float32 Adagrad state
    gap = d["goals"]["row_dtype"]["float16"]
    assert gap["weight_bytes_ratio"] == 0.5 and gap["auc_gap"] == pytest.approx(f16["auc"] - full["auc"])
    assert dh["config"]["kind"] == "double_hash" and 0 < dh["rows"] < full["rows"]
    assert dhe["rows"] == 0 and 0.5 * full["bytes"] / 10 < dhe["bytes"] <= 1.1 * full["bytes"] / 10 and 0 < dhe["auc"] < 1
    assert full["rows"] == d["vocab"] and 0 < qr["rows"] <= d["vocab"] / 10 and 0 < hashing["rows"] <= d["vocab"] / 10
    assert 0 < qr["auc"] < 1 and full["bytes"] == full["rows"] * 4 * 2 * 17  # weights + Adagrad, dim 16 + 1
    assert set(d["goals"]) == {"best_at_10x", "beats_hashing", "row_dtype"} and {"qr_mult@10x", "dhe@10x"} <= set(d["goals"]["beats_hashing"])


def test_double_hash_gives_frequent_keys_their_own_rows_from_their_min_count_th_occurrence(tmp_path):
    c = CompressionConfig.double_hash(50, 3)
    keys = RNG.integers(0, 2**63, 200, dtype=np.uint64)
    freq = RNG.random(200) < 0.5
    sub = c.subkeys(keys, freq)
    own = keys & np.uint64((1 << PART_SHIFT) - 1)
    assert (sub[freq] == own[freq, None]).all()  # both partitions: the key's own row
    shared = sub[~freq]
    assert ((shared >> np.uint64(PART_SHIFT)) == [1, 2]).all()
    assert ((shared & np.uint64((1 << PART_SHIFT) - 1)) < 50).all() and (shared[:, 0] != shared[:, 1]).any()
    with pytest.raises(ValueError, match="frequent"):
        c.subkeys(keys)
    assert TableConfig("t", 4, compression=c).admission.min_count == 3  # its counters count raw keys
    with pytest.raises(ValueError, match="must agree"):
        from damo_hybrid import AdmissionConfig
        TableConfig("t", 4, compression=c, admission=AdmissionConfig(min_count=2))

    cfg = TableConfig("t", 4, initializer=InitializerConfig.normal(std=0.5, seed=1), optimizer=OptimizerConfig.sgd(0.1),
                      compression=c)
    k = np.array([7, 7, 11], dtype=np.uint64)  # key 7 twice a batch, key 11 once
    own7, own11 = (np.array([x], np.uint64) & np.uint64((1 << PART_SHIFT) - 1) for x in (7, 11))
    with EmbeddingStore(tmp_path / "s", [cfg]) as st:
        coll = EmbeddingCollection(st, [Feature("f", "t")], backend="cpu")
        for step in range(3):
            eval_out = coll.eval()({"f": k})["f"]  # eval only asks: it counts nothing
            coll.train()
            out = coll({"f": k})["f"]
            if step == 0:  # later, a training batch's own occurrences turn keys frequent that eval's do not
                torch.testing.assert_close(out, eval_out)
            seven = c.subkeys(np.array([7], np.uint64), np.array([step >= 1]))[0]
            want = st.lookup("t", seven).mean(0)
            torch.testing.assert_close(out[0], torch.from_numpy(want))
            out.sum().backward()
            coll.apply_gradients()
            st.flush()
            assert st.read_rows("t", own7)[1][0] == (step >= 1)  # 2 + 2 occurrences >= 3 at the 2nd batch
            assert st.read_rows("t", own11)[1][0] == (step >= 2)  # its 3rd occurrence at the 3rd batch


def test_the_store_api_does_not_apply_admission_to_a_double_hash_tables_partition_keys(tmp_path):
    """Its counters count raw keys (for the nn module): the numpy API, given partition keys, used to
    drop their gradients as not admitted and to count them into those raw-key counters."""
    cfg = TableConfig("t", 4, optimizer=OptimizerConfig.sgd(0.1), compression=CompressionConfig.double_hash(100, 3))
    parts = CompressionConfig.double_hash(100, 3).subkeys(np.arange(5, dtype=np.uint64), np.zeros(5, bool)).ravel()
    with EmbeddingStore(tmp_path / "s", [cfg]) as st:
        before = st.lookup("t", parts)
        st.apply_gradients("t", parts, np.ones((len(parts), 4), np.float32))
        np.testing.assert_allclose(st.lookup("t", parts), before - 0.1 * np.bincount(
            np.unique(parts, return_inverse=True)[1])[np.unique(parts, return_inverse=True)[1], None], rtol=1e-6)
        assert st.stats().dropped_unadmitted == 0
        assert (st._tables["t"].filter.count(parts) == 0).all()


def test_double_hash_averages_the_first_order_column_so_a_frequent_key_reads_its_own_row(tmp_path):
    """Its two partition keys are its own row: summing the linear column doubled the weight (and
    its gradient); the mean is the row exactly."""
    c = CompressionConfig.double_hash(50, 1)  # every key frequent from its first occurrence
    cfg = TableConfig("t", 5, initializer=InitializerConfig.normal(std=0.5, seed=1), optimizer=OptimizerConfig.sgd(0.1),
                      linear_column=True, compression=c)
    keys = np.arange(8, dtype=np.uint64)
    with EmbeddingStore(tmp_path / "s", [cfg]) as st:
        st.apply_gradients("t", c.own_keys(keys), np.ones((8, 5), np.float32))  # own rows, linear column -0.1
        coll = EmbeddingCollection(st, [Feature("f", "t")], backend="cpu")  # training: its occurrences count
        out = coll.forward_tables({"f": keys})["t"]
        coll.release()
        own = torch.from_numpy(st.lookup("t", c.own_keys(keys)))
        torch.testing.assert_close(out.emb[:, 0], own[:, :4])
        torch.testing.assert_close(out.linear[:, 0], own[:, 4])


def test_fields_on_tables_of_their_own_come_back_in_field_order_and_pipeline_exactly(tmp_path):
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.models import DeepFM
    from damo_hybrid.trainer import Trainer

    own = {"C2": "emb.C2", "C4": "emb.C4"}

    def tables():
        opt, init = OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.3, seed=2)
        return [TableConfig("emb", 9, initializer=init, optimizer=opt, linear_column=True),
                TableConfig("emb.C2", 9, initializer=init, optimizer=opt, linear_column=True,
                            compression=CompressionConfig.qr(10**6, 1000)),
                TableConfig("emb.C4", 9, initializer=init, optimizer=opt, linear_column=True, row_dtype="bfloat16")]

    def run(path, prefetch):
        torch.manual_seed(0)
        data = SyntheticCriteo(64, seed=1, vocab_min=200, vocab_max=2000, n_sparse=6, n_dense=3)
        store = EmbeddingStore(path, tables())
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=700, backend="cpu",
                       field_tables=own)
        Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), data.batch).fit(20, prefetch=prefetch)
        return store, model, data

    (s1, m1, data), (s2, m2, _) = run(tmp_path / "seq", False), run(tmp_path / "pipe", True)
    try:
        assert sum(c.stats.evictions for c in m2.sparse.caches.values()) > 0, "the test must force evictions"
        for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
            np.testing.assert_array_equal(p1.numpy(), p2.numpy(), err_msg=n1)
        for t in ("emb", "emb.C2", "emb.C4"):
            k1, k2 = (np.concatenate([k for k, _ in s.scan(t)]) for s in (s1, s2))
            np.testing.assert_array_equal(k1, k2)
            np.testing.assert_array_equal(s1.read_rows(t, k1)[0].weights, s2.read_rows(t, k2)[0].weights)
        m1.eval()
        b = data.batch(2)
        with torch.no_grad():
            e, first = m1.embeddings(m1.prepare(b.sparse))
        for i, f in enumerate(data.sparse_fields):  # each field's embedding, from its own table
            if f == "C2":
                want = EmbeddingCollection(s1, [Feature(f, "emb.C2")], backend="cpu").eval()({f: b.sparse[f]})[f][:, :8]
                want = want.detach().numpy()
            else:
                want = s1.lookup(own.get(f, "emb"), b.sparse[f])[:, :8]
            np.testing.assert_allclose(e[:, i].numpy(), want, rtol=1e-6, atol=1e-7, err_msg=f)
    finally:
        s1.close()
        s2.close()
    with pytest.raises(ValueError, match="field_tables names fields \\['nope'\\]"):
        with EmbeddingStore(tmp_path / "x", tables()) as st:
            DeepFM(st, ["C1", "C2"], 0, field_tables={"nope": "emb.C2"}, backend="cpu")
    plain = TableConfig("own", 8, optimizer=OptimizerConfig.adagrad(0.05))  # no first-order column
    for first in ("C1", "C2"):  # whichever field reads it, the first one included
        with pytest.raises(ValueError, match="table 'own' must have linear_column=True"):
            with EmbeddingStore(tmp_path / f"y{first}", [*tables(), plain]) as st:
                DeepFM(st, ["C1", "C2"], 0, field_tables={first: "own"}, backend="cpu")


def test_a_fields_own_options_from_the_toml_config(tmp_path, capsys):
    from damo_hybrid.cli import main

    store, cfg = tmp_path / "s", tmp_path / "run.toml"
    base = ('[train]\nsteps = 4\nbatch-size = 128\ndim = 8\nvocab-min = 300\nvocab-max = 3000\neval-batches = 0\n'
            'quiet = true\ncheckpoint-every = 2\n')
    cfg.write_text(base + '[fields.C3]\ntable-compression = "qr:rows=100000,m=400"\n'
                   '[fields.C7]\nrow-dtype = "int16"\n')
    assert main(["train", "--config", str(cfg), "--store", str(store)]) == 0
    with EmbeddingStore(store, read_only=True) as st:
        assert set(st.tables) == {"emb", "emb.C3", "emb.C7"}
        assert st.tables["emb.C3"].compression == CompressionConfig.qr(100000, 400)
        assert st.tables["emb.C7"].row_dtype.value == "int16" and st.tables["emb"].compression is None
        assert all(st.count_rows(t) > 0 for t in st.tables)
    capsys.readouterr()
    assert main(["inspect", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "emb.C3" in out and "row_dtype int16" in out
    other = tmp_path / "other.toml"
    other.write_text(base + '[fields.C3]\nrow-dtype = "float16"\n')
    assert main(["train", "--config", str(other), "--store", str(store), "--resume", "--steps", "6"]) == 2
    assert "resume with the same [fields] options" in capsys.readouterr().err
    for text, msg in [('[fields.Z9]\nrow-dtype = "float16"\n', "names fields ['Z9'] the data does not have"),
                      ('[fields.C3]\nrowdtype = "float16"\n', "unknown [fields.C3] options ['rowdtype']"),
                      ('[fields.C3]\nrow-dtype = "fp8"\n', "[fields.C3]: row_dtype must be one of"),
                      ('[fields.C3]\ntable-compression = "qr:rows=10"\n', "[fields.C3]: ")]:
        other.write_text(base + text)
        assert main(["train", "--config", str(other), "--store", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert main(["export", "--store", str(store), "--onnx", str(tmp_path / "onnx")]) == 0
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["field_tables"]["C3"] == "emb.C3"
