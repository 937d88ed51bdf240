"""The seed's 1.1/1.2 API (``damo.Damo``, ``damo_embedding``) and its 1.0 doc gaps."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

import damo_hybrid.compat as damo
from damo_hybrid.compat.torch import (
    REGISTRY,
    Embedding,
    damo_embedding_init,
    load_model,
    save_model,
)
from damo_hybrid.errors import DamoHybridError, UnknownTableError


@pytest.fixture(autouse=True)
def _reset():
    yield
    REGISTRY.reset()


# ------------------------------------------------------------------ 1.0 doc gaps
def test_ftrl_takes_its_learning_rate_as_gamma_as_the_docs_say():
    a = damo.PyOptimizer({"name": "ftrl", "gamma": 0.05, "beta": 1.0, "lambda1": 0.1, "lambda2": 0.1}).config
    b = damo.PyOptimizer({"name": "ftrl", "alpha": 0.05, "beta": 1.0, "lambda1": 0.1, "lambda2": 0.1}).config
    assert a == b and a.lr == 0.05


def test_sgd_gamma_defaults_to_the_documented_1e_3():
    assert damo.PyOptimizer({"name": "sgd"}).config.lr == 0.001


def test_the_filter_lives_in_its_file_and_reloads(tmp_path):
    p = {"capacity": 1 << 12, "count": 3, "path": str(tmp_path / "cbf")}
    f = damo.PyFilter(p)
    f.add(7, 2)
    assert not f.check(7)
    again = damo.PyFilter(p)  # reload defaults to true: the two counts are there, no save call needed
    again.add(7, 1)
    assert again.check(7)
    fresh = damo.PyFilter({**p, "reload": False})
    assert not fresh.check(7)
    with pytest.raises(ValueError, match="capacity and fpr"):
        damo.PyFilter({**p, "capacity": 1 << 16})


# ------------------------------------------------------------------ damo.Damo
def _config(tmp_path, **opt):
    return {"dir": str(tmp_path / "store"), "ttl": 0,
            "embeddings": [{"dim": 4, "group": 0, "initializer": {"name": "random", "stddev": 0.1},
                            "optimizer": {"name": "adamw", **opt}}]}


def test_damo_reads_its_json_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config(tmp_path)))
    with damo.Damo(str(path)) as d:
        assert d.dims == {0: 4}
        assert d.store.tables["group_0"].optimizer.weight_decay == 0.01  # the seed's 1.2 default lambda


def test_pull_push_equal_torch_adamw(tmp_path):
    keys = np.array([5, -3, 2**40], dtype=np.int64)  # int64 ids keep all their bits
    with damo.Damo(_config(tmp_path, gamma=0.01, beta1=0.8, beta2=0.99, epsilon=1e-6)) as d:
        w0 = np.zeros(3 * 4, np.float32)
        d.pull(0, keys, w0)
        ref = torch.nn.Parameter(torch.from_numpy(w0.reshape(3, 4).copy()))
        opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
        rng = np.random.default_rng(0)
        for _ in range(4):
            g = rng.normal(size=(3, 4)).astype(np.float32)
            d.push(0, keys, g.reshape(-1))
            ref.grad = torch.from_numpy(g)
            opt.step()
        w = np.zeros((3, 4), np.float32)
        d.pull(0, keys, w)
        np.testing.assert_allclose(w, ref.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_seed_initializers_have_the_seeds_ranges(tmp_path):
    cfg = {"dir": str(tmp_path / "s"), "embeddings": [
        {"dim": 16, "group": g, "initializer": {"name": n}, "optimizer": {"name": "adamw"}}
        for g, n in enumerate(["zeros", "uniform", "xavier", "random"])]}
    keys = np.arange(1, 2001, dtype=np.int64)
    with damo.Damo(cfg) as d:
        out = []
        for g in range(4):
            w = np.empty((2000, 16), np.float32)
            d.pull(g, keys, w)
            out.append(w)
    assert not out[0].any()
    for w, b in ((out[1], np.sqrt(1 / 16)), (out[2], np.sqrt(6 / 16))):
        assert np.abs(w).max() <= b and np.abs(w).max() > 0.95 * b
    assert abs(out[3].std() - 1.0) < 0.05


def test_key_zero_is_padding_and_repeated_keys_step_once(tmp_path):
    with damo.Damo(_config(tmp_path)) as d:
        w = np.full((3, 4), 9.0, np.float32)
        d.pull(0, np.array([0, 1, 0], np.int64), w)
        assert not w[[0, 2]].any() and w[1].any()
        d.push(0, np.array([0, 1, 1], np.int64), np.ones((3, 4), np.float32))
        assert d.store.count_rows("group_0") == 1  # key 0 was never stored
        assert d.store.read_rows("group_0", np.array([1], np.uint64))[0].count[0] == 1  # summed, stepped once


def test_bad_calls_raise_and_change_nothing(tmp_path):
    with damo.Damo(_config(tmp_path)) as d:
        with pytest.raises(UnknownTableError, match="unknown group 3"):
            d.pull(3, np.array([1], np.int64), np.zeros(4, np.float32))
        with pytest.raises(TypeError, match="int64"):
            d.push(0, np.array([1.0]), np.zeros(4, np.float32))
        with pytest.raises(ValueError, match="shape"):
            d.push(0, np.array([1], np.int64), np.zeros(5, np.float32))
        assert d.store.count_rows("group_0") == 0
    with pytest.raises(ValueError, match="unknown Damo config fields"):
        damo.Damo({"dir": str(tmp_path / "x"), "embeddings": [], "tl": 3})


def test_checkpoint_and_load_restore_rows_and_optimizer_state(tmp_path):
    keys = np.array([1, 2, 3], np.int64)
    g = np.ones(12, np.float32)
    with damo.Damo(_config(tmp_path)) as d:
        d.push(0, keys, g)
        d.checkpoint(tmp_path / "ckpt.bin")
        d.push(0, keys, g)
        want = np.zeros(12, np.float32)
        d.pull(0, keys, want)
        d.load(tmp_path / "ckpt.bin")  # back to one step, with its Adam moments
        d.push(0, keys, g)
        got = np.zeros(12, np.float32)
        d.pull(0, keys, got)
        np.testing.assert_array_equal(got, want)
        (tmp_path / "junk.bin").write_bytes(b"\0" * 64)
        with pytest.raises(DamoHybridError, match="not a damo_hybrid checkpoint"):
            d.load(tmp_path / "junk.bin")


def test_dump_writes_the_seeds_format(tmp_path):
    with damo.Damo(_config(tmp_path)) as d:
        d.push(0, np.array([4, 9], np.int64), np.ones(8, np.float32))
        d.dump(tmp_path / "dump.bin")
        want = np.zeros((2, 4), np.float32)
        d.pull(0, np.array([4, 9], np.int64), want)
    raw = (tmp_path / "dump.bin").read_bytes()
    n, group, dim, count = struct.unpack_from("<iiiq", raw)
    assert (n, group, dim, count) == (1, 0, 4, 2)
    rec = np.frombuffer(raw, [("key", "<i8"), ("group", "<i4"), ("w", "<f4", (4,))], offset=20)
    assert sorted(rec["key"]) == [4, 9] and (rec["group"] == 0).all()
    np.testing.assert_array_equal(rec["w"][np.argsort(rec["key"])], want)


# ------------------------------------------------------------------ damo_embedding
class SeedStyleDeepFM(nn.Module):
    """A DeepFM as the seed's README writes one: one Embedding over all fields."""

    def __init__(self, dim: int, fields: int, opt: dict | None = None) -> None:
        super().__init__()
        self.v = Embedding(dim=dim, group=0, initializer={"name": "uniform"},
                           optimizer=opt or {"name": "adamw", "gamma": 0.01})
        self.mlp = nn.Sequential(nn.Linear(fields * dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v = self.v(ids)
        fm = 0.5 * (v.sum(1).pow(2) - (v * v).sum(1)).sum(1, keepdim=True)
        return torch.sigmoid(fm + self.mlp(v.flatten(1)))


def _batches(n=6, b=32, fields=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 200, (b, fields), generator=g), torch.randint(0, 2, (b, 1), generator=g).float())
            for _ in range(n)]


def _train(model, batches):
    opt = torch.optim.Adam([p for p in model.parameters()], lr=0.01)
    model.train()
    for x, y in batches:
        loss = nn.functional.binary_cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_embedding_gradients_are_the_losss_own(tmp_path):
    model = Embedding(3, 0, initializer={"name": "zeros"}, optimizer={"name": "sgd", "gamma": 1.0})
    holder = nn.Module()
    holder.e = model
    damo_embedding_init(holder, tmp_path / "w", 0)
    ids = torch.tensor([[1, 2], [2, 0]])
    target = torch.arange(12, dtype=torch.float32).view(2, 2, 3)
    ((model(ids) - target) ** 2).mean().backward()
    ref = torch.zeros(3, 3, requires_grad=True)  # rows of ids 0, 1, 2 with torch's own embedding
    ((nn.functional.embedding(ids, ref) - target) ** 2).mean().backward()
    w = np.zeros((2, 3), np.float32)
    model.damo.pull(0, np.array([1, 2], np.int64), w)
    np.testing.assert_allclose(w, -ref.grad[1:].numpy(), rtol=1e-6)  # SGD at lr 1 from zero: -grad
    assert model.damo.store.count_rows("group_0") == 2  # the padding id 0 was not stepped


def test_readme_deepfm_trains_saves_reloads_and_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    model = SeedStyleDeepFM(4, 5)
    damo_embedding_init(model, tmp_path / "work", 86400)
    batches = _batches()
    _train(model, batches[:4])
    model.eval()
    x = batches[5][0]
    with torch.no_grad():
        before = model(x)
    save_model(model, tmp_path / "out")
    loaded = load_model(tmp_path / "out", workdir=tmp_path / "restored")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), before, rtol=0, atol=0)
    # and training goes on from the same rows and optimizer state on both
    _train(model, batches[4:5])
    _train(loaded, batches[4:5])
    model.eval(); loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.v(x), model.v(x), rtol=0, atol=0)


def test_two_models_over_two_workdirs_train_side_by_side(tmp_path):
    a, b = SeedStyleDeepFM(4, 5), SeedStyleDeepFM(4, 5)
    da = damo_embedding_init(a, tmp_path / "a", 0)
    db = damo_embedding_init(b, tmp_path / "b", 0)
    assert da is not db
    _train(a, _batches(2))
    assert da.store.count_rows("group_0") > 0 and db.store.count_rows("group_0") == 0
    assert damo_embedding_init(SeedStyleDeepFM(4, 5), tmp_path / "a", 0) is da  # same workdir, same store


def test_an_unbound_embedding_says_what_to_do():
    with pytest.raises(DamoHybridError, match="damo_embedding_init"):
        SeedStyleDeepFM(4, 5)(torch.ones(2, 5, dtype=torch.int64))


def test_inference_export_in_the_seeds_layout_predicts_as_the_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = SeedStyleDeepFM(4, 5)
    damo_embedding_init(model, tmp_path / "work", 0)
    batches = _batches()
    _train(model, batches)
    save_model(model, tmp_path / "eval", False, dummy_input=torch.randint(1, 1000, (100, 5)),
               input_names=["input"], output_names=["output"],
               dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}})
    mapper = json.loads((tmp_path / "eval" / "inference" / "mapper.json").read_text())
    x = batches[2][0]  # trained on: every id is stored
    idx = np.vectorize(lambda k: mapper["0"].get(str(k), 0))(x.numpy()).astype(np.int64)
    assert (idx > 0).all()
    sess = ort.InferenceSession(str(tmp_path / "eval" / "inference" / "model.onnx"))
    got = sess.run(["output"], {"input": idx})[0]
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5, rtol=0)
