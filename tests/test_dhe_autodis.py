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
