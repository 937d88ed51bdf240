"""A table whose last column is the first-order weight (``linear_column``): DeepFM and
Wide&Deep on one row per key train exactly as on two tables fed by the same keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.cli import main
from damo_hybrid.errors import ConfigConflictError
from damo_hybrid.models import DeepFM, WideAndDeep
from damo_hybrid.rows.initializers import RowInitializer

FIELDS = ["a", "b", "c"]
INIT = InitializerConfig.normal(std=0.1, seed=5)  # counter-based: the first 4 of 5 columns equal a dim-4 draw
OPT = OptimizerConfig.adagrad(0.1)


def _batches(n: int) -> list[tuple[dict[str, np.ndarray], torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    return [({f: rng.integers(0, 40, 32).astype(np.uint64) for f in FIELDS},
             torch.from_numpy(rng.standard_normal((32, 2)).astype(np.float32)),
             torch.from_numpy(rng.integers(0, 2, 32).astype(np.float32))) for _ in range(n)]


def _train(model, batches) -> list[torch.Tensor]:
    torch.manual_seed(0)
    for p in model.dense_parameters():  # the same dense start on both sides
        torch.nn.init.constant_(p, 0.01)
    opt = torch.optim.SGD(model.dense_parameters(), lr=0.1)
    logits = []
    for sparse, dense, y in batches:
        out = model(model.prepare(sparse), dense)
        logits.append(out.detach().clone())
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(out, y).backward()
        model.apply_sparse_gradients()
        opt.step()
    return logits


@pytest.mark.parametrize("cls", [DeepFM, WideAndDeep])
def test_one_row_per_key_trains_like_two_tables(tmp_path, cls):
    batches = _batches(6)
    with EmbeddingStore(tmp_path / "two", [TableConfig("emb", 4, initializer=INIT, optimizer=OPT),
                                           TableConfig("lin", 1, initializer=InitializerConfig.zeros(),
                                                       optimizer=OPT)]) as st2:
        m2 = cls(st2, FIELDS, 2, hidden=(8,), backend="cpu", cache_mb=1e-6, min_cache_rows=64)
        assert set(m2.sparse.tiers) == {"emb", "lin"}
        want = _train(m2, batches)
        m2.sparse.flush()
        keys = np.arange(40, dtype=np.uint64)
        emb, lin = st2.lookup("emb", keys), st2.lookup("lin", keys)
    with EmbeddingStore(tmp_path / "one", [TableConfig("emb", 5, initializer=INIT, optimizer=OPT,
                                                       linear_column=True)]) as st1:
        m1 = cls(st1, FIELDS, 2, hidden=(8,), backend="cpu", cache_mb=1e-6, min_cache_rows=64)
        assert set(m1.sparse.tiers) == {"emb"} and m1.dim == 4
        got = _train(m1, batches)
        m1.sparse.flush()
        rows = st1.lookup("emb", keys)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows[:, :4], emb, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rows[:, 4:], lin, rtol=1e-5, atol=1e-7)


def test_the_linear_column_starts_at_zero_and_cannot_change(tmp_path):
    cfg = TableConfig("emb", 5, initializer=INIT, linear_column=True)
    keys = np.array([1, 2, 2**64 - 1], np.uint64)
    init = RowInitializer(INIT, "emb", 5, zero_last=True)(keys)
    np.testing.assert_array_equal(init[:, 4], 0.0)
    np.testing.assert_array_equal(init[:, :4], RowInitializer(INIT, "emb", 4)(keys))
    with EmbeddingStore(tmp_path / "s", [cfg]) as st:
        np.testing.assert_array_equal(st.lookup("emb", keys), init)
    with pytest.raises(ConfigConflictError, match="linear_column=True, opened with False"):
        EmbeddingStore(tmp_path / "s", [TableConfig("emb", 5, initializer=INIT)])
    with pytest.raises(ValueError, match="linear_column needs dim >= 2"):
        TableConfig("emb", 1, linear_column=True)
    with pytest.raises(TypeError, match="linear_column must be a bool"):
        TableConfig("emb", 4, linear_column=1)


ARGV = ["train", "--quiet", "--steps", "2", "--batch-size", "64", "--dim", "4", "--vocab-min", "50",
        "--vocab-max", "100", "--eval-batches", "0", "--threads", "1"]


def test_train_uses_one_row_per_key_and_keeps_a_store_of_two_tables(tmp_path, capsys):
    assert main(ARGV + ["--store", str(tmp_path / "new")]) == 0
    with EmbeddingStore(tmp_path / "new", read_only=True) as s:
        assert list(s.tables) == ["emb"] and s.tables["emb"].dim == 5 and s.tables["emb"].linear_column
    assert main(ARGV + ["--store", str(tmp_path / "dcn"), "--model", "dcn"]) == 0
    with EmbeddingStore(tmp_path / "dcn", read_only=True) as s:
        assert s.tables["emb"].dim == 4 and not s.tables["emb"].linear_column
    tables = [TableConfig("emb", 4, initializer=InitializerConfig.truncated_normal(std=0.01, seed=0),
                          optimizer=OptimizerConfig.adagrad(0.05)),
              TableConfig("lin", 1, initializer=InitializerConfig.zeros(), optimizer=OptimizerConfig.adagrad(0.05))]
    EmbeddingStore(tmp_path / "old", tables).close()  # the layout of earlier versions
    assert main(ARGV + ["--store", str(tmp_path / "old")]) == 0
    with EmbeddingStore(tmp_path / "old", read_only=True) as s:
        assert s.step("emb") == s.step("lin") == 2
