"""The NaN/Inf policy covers a step's results as well as its gradients, in every path that
steps rows (uncached store, cached store, host and device tiers of a collection, the trainer's
dense step), and every table of a step sees the same decision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.errors import NonFiniteGradientError, NonFiniteUpdateError
from damo_hybrid.nn import EmbeddingCollection, Feature

KEYS = np.array([1, 2, 3], np.uint64)


def _table(name: str = "t", opt: OptimizerConfig | None = None, **kw) -> TableConfig:
    return TableConfig(name, 2, initializer=InitializerConfig.normal(std=0.1, seed=1),
                       optimizer=opt or OptimizerConfig.sgd(1e30), **kw)


def _grads(big: float = 1e10) -> np.ndarray:
    """Finite gradients; row 1 (key 2) overflows a step at lr 1e30 (or Adagrad's g*g)."""
    g = np.full((3, 2), 1e-35, np.float32)
    g[1] = big
    return g


def _open(tmp_path, tables, cached: bool) -> EmbeddingStore:
    st = EmbeddingStore(tmp_path / "s", tables)
    if cached:
        for t in tables:
            st.cache_table(t.name, rows=2)  # key 1 or 2 resident, the other stepped through
            st.lookup(t.name, KEYS[:1])
    return st


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("opt, big", [(OptimizerConfig.sgd(1e30), 1e10), (OptimizerConfig.adagrad(0.1), 3e38)],
                         ids=["sgd-huge-lr", "adagrad-state-overflow"])
def test_an_overflowing_step_raises_and_stores_nothing(tmp_path, cached, opt, big):
    t = _table(opt=opt)
    with _open(tmp_path, [t], cached) as st:
        st.apply_gradients("t", KEYS, np.full((3, 2), 1e-3, np.float32))
        before, _ = st.read_rows("t", KEYS)
        with pytest.raises(NonFiniteUpdateError, match=r"table 't' would store NaN or Inf in 1 row.*first key 2"):
            st.apply_gradients("t", KEYS, _grads(big))
        after, _ = st.read_rows("t", KEYS)
        np.testing.assert_array_equal(after.weights, before.weights)  # no row of the step changed
        np.testing.assert_array_equal(after.state, before.state)
        assert st.step("t") == 1
    with EmbeddingStore(tmp_path / "s") as st:  # and nothing non-finite reached the disk
        rows, found = st.read_rows("t", KEYS)
        assert found.all() and np.isfinite(rows.weights).all() and np.isfinite(rows.state).all()


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_an_overflowing_row_is_dropped_and_counted_under_skip(tmp_path, cached):
    with _open(tmp_path, [_table(nonfinite="skip")], cached) as st:
        before = st.lookup("t", KEYS)
        st.apply_gradients("t", KEYS, _grads())
        after = st.lookup("t", KEYS)
        np.testing.assert_array_equal(after[1], before[1])  # kept its old value
        np.testing.assert_allclose(after[[0, 2]], before[[0, 2]] - np.float32(1e30) * np.float32(1e-35), rtol=1e-6)
        assert st.stats().dropped_nonfinite == 1 and st.step("t") == 1
        st.flush()
        assert np.isfinite(st.read_rows("t", KEYS)[0].weights).all()


@pytest.mark.parametrize("device_tier", [False, True], ids=["host", "device-tier-on-cpu"])
def test_an_overflow_in_one_table_steps_no_table(tmp_path, device_tier):
    tables = [_table("a", OptimizerConfig.sgd(0.1)), _table("b")]
    with EmbeddingStore(tmp_path / "s", tables) as st:
        emb = EmbeddingCollection(st, [Feature("x", "a"), Feature("y", "b")], backend="cpu",
                                  device_cache_mb=1.0 if device_tier else None)
        a0, b0 = st.lookup("a", KEYS), st.lookup("b", KEYS)
        out = emb({"x": KEYS, "y": KEYS})
        (out["x"].sum() + (out["y"] * torch.tensor([[0.0], [1e10], [0.0]])).sum()).backward()
        with pytest.raises(NonFiniteUpdateError, match="table 'b'"):
            emb.apply_gradients()
        np.testing.assert_array_equal(st.lookup("a", KEYS), a0)  # 'a' was checked, staged, and not stored
        np.testing.assert_array_equal(st.lookup("b", KEYS), b0)
        assert st.step("a") == st.step("b") == 0
        emb.flush()
        assert st.count_rows("a") == st.count_rows("b") == 0


@pytest.mark.parametrize("device_tier", [False, True], ids=["host", "device-tier-on-cpu"])
def test_skip_drops_the_bad_rows_of_every_table_alike(tmp_path, device_tier):
    """A NaN gradient in table 'a' and an overflow in table 'b': each drops its bad row, steps the rest."""
    tables = [_table("a", OptimizerConfig.sgd(0.1), nonfinite="skip"), _table("b", nonfinite="skip")]
    with EmbeddingStore(tmp_path / "s", tables) as st:
        emb = EmbeddingCollection(st, [Feature("x", "a"), Feature("y", "b")], backend="cpu",
                                  device_cache_mb=1.0 if device_tier else None)
        a0, b0 = st.lookup("a", KEYS), st.lookup("b", KEYS)
        out = emb({"x": KEYS, "y": KEYS})
        (out["x"] * torch.tensor([[float("nan")], [1.0], [1.0]])).sum().backward(retain_graph=True)
        (out["y"] * torch.tensor([[1e-35], [1e10], [1e-35]])).sum().backward()
        emb.apply_gradients()
        a1, b1 = st.lookup("a", KEYS), st.lookup("b", KEYS)
        np.testing.assert_array_equal(a1[0], a0[0])
        np.testing.assert_allclose(a1[1:], a0[1:] - np.float32(0.1), rtol=1e-6)
        np.testing.assert_array_equal(b1[1], b0[1])
        assert not np.array_equal(b1[[0, 2]], b0[[0, 2]])
        assert st.stats().dropped_nonfinite == 2 and st.step("a") == st.step("b") == 1
        emb.flush()
        assert st.count_rows("a") == st.count_rows("b") == 2


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_the_dense_step_sees_the_same_decision(tmp_path, policy):
    """A NaN in the dense input makes every gradient NaN: under ``raise`` the trainer refuses the
    whole step (no sparse row, no dense weight changes); under ``skip`` it drops the sparse rows
    with NaN gradients (those of the bad sample) and skips the dense step, counted, and the next
    finite batch trains."""
    from damo_hybrid.data.synthetic import Batch
    from damo_hybrid.models import DeepFM
    from damo_hybrid.pipeline.trainer import Trainer

    tables = [_table("emb", OptimizerConfig.adagrad(0.1), nonfinite=policy),
              TableConfig("lin", 1, optimizer=OptimizerConfig.adagrad(0.1), nonfinite=policy)]
    rng = np.random.default_rng(0)

    def batch(i: int) -> Batch:
        dense = rng.standard_normal((8, 3)).astype(np.float32)
        if i == 0:
            dense[3, 1] = np.nan
        return Batch({"f": rng.integers(0, 5, 8).astype(np.uint64), "g": rng.integers(0, 5, 8).astype(np.uint64)},
                     dense, rng.integers(0, 2, 8).astype(np.float32))

    with EmbeddingStore(tmp_path / "s", tables) as st:
        model = DeepFM(st, ["f", "g"], 3, hidden=(4,), backend="cpu")
        opt = torch.optim.Adam(model.dense_parameters(), lr=0.1)
        trainer = Trainer(model, opt, batch)
        dense0 = {k: v.clone() for k, v in model.state_dict().items()}
        if policy == "raise":
            with pytest.raises(NonFiniteGradientError, match="dense gradients hold NaN or Inf"):
                trainer.train_step(0)
        else:
            trainer.train_step(0)
            assert trainer.skipped_dense_steps == 1 and st.stats().dropped_nonfinite > 0
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, dense0[k], rtol=0, atol=0)
        model.sparse.flush()
        if policy == "raise":
            assert st.count_rows("emb") == st.count_rows("lin") == 0
        else:  # the other samples' rows have finite gradients and were stepped; no bad row was stored
            for t in ("emb", "lin"):
                for _, rows in st.scan(t):
                    assert np.isfinite(rows.weights).all() and np.isfinite(rows.state).all()
        assert all((c.pins == 0).all() for c in model.sparse.caches.values())
        trainer.train_step(1)  # a finite batch trains as usual
        assert any(not torch.equal(v, dense0[k]) for k, v in model.state_dict().items())
