"""Table-free embeddings: DHE's codes and decoder, and AutoDis against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid.nn.autodis import AutoDis
from damo_hybrid.nn.dhe import DeepHashEmbedding, dhe_codes


def test_dhe_codes_are_fixed_distinct_and_distributed_as_asked():
    keys = np.random.default_rng(0).integers(0, 2**63, 20_000, dtype=np.uint64)
    g = dhe_codes(keys, 64)
    np.testing.assert_array_equal(g, dhe_codes(keys, 64))  # a pure function of (key, seed)
    assert g.shape == (20_000, 64) and g.dtype == np.float32
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01  # Box-Muller: standard normal
    u = dhe_codes(keys, 64, "uniform")
    assert u.min() >= -1 and u.max() <= 1 and abs(u.mean()) < 0.01 and abs(u.var() - 1 / 3) < 0.01
    assert len(np.unique(g, axis=0)) == len(keys)  # every id its own code
    assert not np.array_equal(g, dhe_codes(keys, 64, seed=1))
    with pytest.raises(ValueError, match="dist"):
        dhe_codes(keys, 4, "cauchy")


def test_dhe_decodes_each_distinct_key_once_and_trains_exactly_through_the_pipeline(tmp_path):
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.models import DeepFM
    from damo_hybrid.trainer import Trainer

    data = SyntheticCriteo(256, seed=3, vocab_min=100, vocab_max=1000, n_sparse=6, n_dense=3, signal=3.0)
    held = SyntheticCriteo(256, seed=3, vocab_min=100, vocab_max=1000, n_sparse=6, n_dense=3, signal=3.0, split=1)

    def run(prefetch):
        torch.manual_seed(0)
        dhe = DeepHashEmbedding(data.sparse_fields, 8, k=32, hidden=(32,))
        m = DeepFM(None, data.sparse_fields, 3, hidden=(16,), embedding_module=dhe)
        t = Trainer(m, torch.optim.Adam(m.parameters(), lr=3e-3), data.batch, held.batch)
        before, _ = t.evaluate(4)
        t.fit(60, prefetch=prefetch)
        return m, before, t.evaluate(4)[0]

    m1, before, after = run(False)
    m2, _, after2 = run(True)
    assert after > before + 0.05, (before, after)  # it learns, with no table at all
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0, msg=n)  # pipelined == sequential
    b = data.batch(0)
    same = {f: b.sparse["C1"] for f in data.sparse_fields}  # every field the same keys
    e, first = m1.rows(m1.rows.prepare(same))
    assert e.shape == (256, 6, 8) and first.shape == (256,)
    torch.testing.assert_close(e[:, 0], e[:, 5])
    batch = m1.rows.prepare(same)
    assert len(batch.codes) == len(np.unique(b.sparse["C1"]))


def test_autodis_matches_its_formula_and_learns_a_nonlinear_value_map():
    torch.manual_seed(0)
    ad = AutoDis(3, 4, meta=5, temperature=0.5, alpha=0.2)
    x = torch.randn(7, 3)
    e = ad(x)
    assert e.shape == (7, 3, 4)
    for b in range(7):  # the paper's formula, one value at a time
        for j in range(3):
            h = torch.nn.functional.leaky_relu(ad.w[j] * x[b, j])
            p = torch.softmax((ad.proj[j] @ h + 0.2 * h) / 0.5, 0)
            torch.testing.assert_close(e[b, j], p @ ad.meta_emb[j])
    torch.testing.assert_close(ad.assignment(x).sum(-1), torch.ones(7, 3))
    with pytest.raises(ValueError, match="expected values"):
        ad(torch.randn(7, 2))
    # a bump no linear map of x fits: AutoDis + a linear read-out does
    xs = torch.linspace(-2, 2, 512).unsqueeze(1)
    ys = torch.exp(-4 * xs[:, 0] ** 2)
    ad = AutoDis(1, 8, meta=16)
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam([*ad.parameters(), *head.parameters()], lr=2e-2)
    for _ in range(400):
        opt.zero_grad()
        loss = ((head(ad(xs)[:, 0]).squeeze(1) - ys) ** 2).mean()
        loss.backward()
        opt.step()
    linear_best = ((ys - ys.mean()) ** 2).mean()  # x is symmetric: the best line is flat
    assert loss.item() < 0.1 * linear_best.item()


@pytest.mark.parametrize("name", ["deepfm", "wide_deep", "dcn", "dlrm"])
def test_every_model_embeds_its_dense_features_with_autodis_and_learns(tmp_path, name):
    from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.models import MODELS
    from damo_hybrid.nn.models import model_tables
    from damo_hybrid.trainer import Trainer

    torch.manual_seed(0)
    data = SyntheticCriteo(512, seed=4, vocab_min=100, vocab_max=1000, n_sparse=8, n_dense=4, signal=2.0)
    held = SyntheticCriteo(512, seed=4, vocab_min=100, vocab_max=1000, n_sparse=8, n_dense=4, signal=2.0, split=1)
    tables = model_tables(name, 8, OptimizerConfig.adagrad(0.1), InitializerConfig.normal(std=0.05))
    with EmbeddingStore(tmp_path / "s", tables) as store:
        kw = {"top": (16,)} if name == "dlrm" else {"hidden": (16,)}
        m = MODELS[name](store, data.sparse_fields, 4, cache_mb=1, backend="cpu", dense_mode="autodis", **kw)
        assert m.autodis is not None and m.n_fields == 12 and m.n_dense_in == 0
        e, _, dense_in = m.embeddings_and_dense(m.prepare(data.batch(0).sparse), torch.from_numpy(data.batch(0).dense))
        m.sparse.release()
        assert e.shape == (512, 12, 8) and dense_in.shape == (512, 0)
        t = Trainer(m, torch.optim.Adam(m.parameters(), lr=3e-3), data.batch, held.batch)
        before, _ = t.evaluate(3)
        t.fit(40)
        after, _ = t.evaluate(3)
        assert after > max(0.6, before + 0.05), (before, after)
        assert m.autodis.meta_emb.grad is not None  # trained by the dense optimizer
    with pytest.raises(ValueError, match="dense_mode"):
        MODELS[name](None, data.sparse_fields, 4, dense_mode="bucket", embedding_module=torch.nn.Linear(1, 1))


def test_cli_trains_exports_and_resumes_with_autodis(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from damo_hybrid.cli import main
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.serving import Predictor

    store = tmp_path / "s"
    argv = ["train", "--steps", "4", "--batch-size", "256", "--dim", "8", "--vocab-min", "300", "--vocab-max", "3000",
            "--eval-batches", "0", "--quiet", "--store", str(store), "--checkpoint-every", "2", "--dense-mode", "autodis"]
    assert main(argv) == 0
    assert main(["export", "--store", str(store), "--onnx", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    b = SyntheticCriteo(64, seed=0, vocab_min=300, vocab_max=3000).batch(1)
    assert np.isfinite(Predictor(tmp_path / "x").predict(b.sparse, b.dense)).all()
    assert main(argv[:-2] + ["--resume", "--steps", "6"]) == 2  # resumed without AutoDis: refused, in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dense-mode autodis" in err[0]
    assert main(argv + ["--resume", "--steps", "6"]) == 0


def test_a_model_without_tables_refuses_a_non_finite_dense_step():
    """No table has a skip policy to follow: NaN dense gradients raise (they used to be skipped)."""
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.errors import NonFiniteGradientError
    from damo_hybrid.models import DeepFM
    from damo_hybrid.trainer import Trainer

    data = SyntheticCriteo(64, seed=3, vocab_min=100, vocab_max=1000, n_sparse=3, n_dense=2)
    dhe = DeepHashEmbedding(data.sparse_fields, 4, k=8, hidden=(8,))
    m = DeepFM(None, data.sparse_fields, 2, hidden=(8,), embedding_module=dhe)
    with torch.no_grad():
        dhe.decoder[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-3), data.batch).fit(1, prefetch=False)
