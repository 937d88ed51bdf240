"""Quality parity on real data (skips without the shared datasets): the store, host cache and
pipeline learn exactly what the same model with in-memory torch embeddings learns."""

from __future__ import annotations

from pathlib import Path

import pytest

from damo_hybrid.bench.quality import DATASETS, run_quality

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.parametrize("name", ["criteo", "movielens"])
def test_damo_matches_in_memory_torch_on_real_data(name):
    spec = DATASETS[name]
    if not all((ROOT / f).exists() for f in spec.train + spec.eval):
        pytest.skip(f"shared dataset {name} not present")
    r = run_quality(ROOT, (name,), seeds=(0,), epochs=1, hidden=(64, 64), log_fn=lambda *_: None)["datasets"][name]
    m = r["mean"]
    assert m["damo"]["auc"] > 0.6  # it learned from real ids
    assert abs(r["auc_gap"]) <= 0.005
    assert abs(m["damo"]["logloss"] - m["in_memory"]["logloss"]) <= 0.005
