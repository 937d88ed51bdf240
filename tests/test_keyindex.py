from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from damo_hybrid.cache.keyindex import KeyIndex

POOL = [0, 1, 2, 3, 17, 2**32, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]


@given(st.lists(st.tuples(st.sampled_from(["ins", "del", "find"]), st.lists(st.sampled_from(POOL), unique=True)),
                max_size=40))
def test_matches_a_dict(ops):
    idx, model, nxt = KeyIndex(4), {}, 0
    for op, ks in ops:
        keys = np.array(ks, np.uint64)
        if op == "ins":
            new = [k for k in ks if k not in model]
            slots = np.arange(nxt, nxt + len(new), dtype=np.int64)
            nxt += len(new)
            idx.insert(np.array(new, np.uint64), slots)
            model.update(zip(new, slots.tolist()))
        elif op == "del":
            present = idx.delete(keys)
            assert present.tolist() == [k in model for k in ks]
            for k in ks:
                model.pop(k, None)
        got = idx.lookup(keys)
        assert got.tolist() == [model.get(k, -1) for k in ks]
        assert len(idx) == len(model)
    k, s = idx.items()
    assert dict(zip(k.tolist(), s.tolist())) == model


def test_large_batches_with_churn():
    rng = np.random.default_rng(0)
    idx = KeyIndex(100_000)
    keys = np.unique(rng.integers(0, 2**63, 300_000, dtype=np.int64).view(np.uint64))
    rng.shuffle(keys)
    idx.insert(keys[:100_000], np.arange(100_000))
    for r in range(5):  # evict 20k, insert 20k new, many times: tombstones and rebuilds
        out = keys[r * 20_000:(r + 1) * 20_000]
        assert idx.delete(out).all()
        new = keys[100_000 + r * 20_000:100_000 + (r + 1) * 20_000]
        idx.insert(new, np.arange(r * 20_000, (r + 1) * 20_000))
    live = keys[100_000:200_000]
    assert (idx.lookup(live) >= 0).all()
    assert (idx.lookup(keys[:100_000]) == -1).all()
    assert len(idx) == 100_000
