from __future__ import annotations

import numpy as np
import pytest

from damo_hybrid.data.metrics import auc, logloss
from damo_hybrid.data.synthetic import SyntheticCriteo, zipf_ranks


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    ref = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auc(y, s) == pytest.approx(ref)
    assert auc(np.ones(3), np.arange(3)) == 0.5


def test_logloss():
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


def test_synthetic_is_deterministic_and_criteo_like():
    d = SyntheticCriteo(2048, seed=3)
    a, b = d.batch(5), d.batch(5)
    for f in d.sparse_fields:
        np.testing.assert_array_equal(a.sparse[f], b.sparse[f])
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(d.batch(6).label, a.label)
    assert len(d.sparse_fields) == 26 and a.dense.shape == (2048, 13)
    assert 0.1 < a.label.mean() < 0.6
    share = np.mean([len(np.unique(a.sparse[f])) / 2048 for f in d.sparse_fields])
    assert 0.2 < share < 0.8  # Zipf: many repeats within a batch, many singletons too


def test_zipf_ranks_bounds():
    r = zipf_ranks(np.random.default_rng(0), 100000, 50)
    assert r.min() == 0 and r.max() == 49 and (np.bincount(r)[0] > np.bincount(r)[10])
