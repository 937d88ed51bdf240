"""A hypothesis state machine drives the cache tiers (host tier, device tier on the CPU device,
writer, RocksDB) through two collections over one table, the store's own API, flushes, forced
evictions, checkpoints and close/reopen, against a plain dict of rows: no update is ever lost."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.nn import EmbeddingCollection, Feature
from damo_hybrid.rows.initializers import RowInitializer

DIM = 2
TABLES = [TableConfig("t", DIM, initializer=InitializerConfig.uniform(-1, 1, seed=3), optimizer=OptimizerConfig.sgd(0.5))]
POOL = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2**63, 2**64 - 1], np.uint64)
INIT = RowInitializer(TABLES[0].initializer, "t", DIM)
HOST_ROWS, DEVICE_ROWS = 6, 4  # far fewer than the pool: every rule evicts in some tier

batch_st = st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=5).filter(
    lambda ix: len(set(ix)) <= DEVICE_ROWS)  # one batch's distinct keys must fit the device tier
coef_st = st.lists(st.integers(-2, 2), min_size=5, max_size=5)


class TiersVsDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.model = {int(k): INIT(np.array([k], np.uint64))[0].copy() for k in POOL}
        self.steps = 0
        self.n_ckpt = 0
        self._open()

    def _open(self) -> None:
        self.store = EmbeddingStore(self.dir / "s", TABLES)
        self.store.cache_table("t", HOST_ROWS, DEVICE_ROWS, "cpu")
        # both ask for budgets of their own: the store's tiers win, and both share them
        self.cols = [EmbeddingCollection(self.store, [Feature("x", "t")], backend="cpu", cache_mb=1.0,
                                         device_cache_mb=1.0) for _ in range(2)]

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def expected(self) -> np.ndarray:
        return np.stack([self.model[int(k)] for k in POOL])

    def sgd(self, keys: np.ndarray, coef: list[int]) -> None:
        """The reference step: per-key gradient sums, each row stepped once."""
        g: dict[int, float] = {}
        for k, ci in zip(keys.tolist(), coef):
            g[k] = g.get(k, 0.0) + ci
        for k, gk in g.items():
            self.model[k] = (self.model[k] - np.float32(0.5) * np.float32(gk)).astype(np.float32)
        self.steps += 1

    @rule(which=st.integers(0, 1), ix=batch_st, coef=coef_st)
    def train_step(self, which, ix, coef):
        """One step through a collection: the loss sum(c_i * e_i) gives row k the gradient
        sum of c_i over its occurrences (small integers: exact in float32)."""
        keys = POOL[ix]
        emb = self.cols[which]
        out = emb({"x": keys})["x"]
        c = torch.tensor(coef[:len(ix)], dtype=torch.float32).unsqueeze(1).expand(-1, DIM)
        (out * c).sum().backward()
        emb.apply_gradients()
        self.sgd(keys, coef)

    @rule(ix=batch_st, coef=coef_st)
    def store_step(self, ix, coef):
        keys = POOL[ix]
        g = np.repeat(np.array(coef[:len(ix)], np.float32)[:, None], DIM, 1)
        self.store.apply_gradients("t", keys, g)
        self.sgd(keys, coef)

    @rule(which=st.integers(0, 1), ix=batch_st)
    def evict(self, which, ix):
        """An inference forward makes other rows resident, evicting in both tiers."""
        emb = self.cols[which]
        emb.eval()
        with torch.no_grad():
            emb({"x": POOL[ix]})
        emb.train()

    @rule()
    def flush(self):
        self.store.flush()

    @rule()
    def checkpoint(self):
        self.n_ckpt += 1
        ck = self.dir / f"ck{self.n_ckpt}"
        self.store.checkpoint(ck)
        with EmbeddingStore.from_checkpoint(ck, self.dir / f"r{self.n_ckpt}") as r:
            np.testing.assert_array_equal(r.lookup("t", POOL), self.expected())
            assert r.step("t") == self.steps

    @rule()
    def close_and_reopen(self):
        self.store.close()
        self._open()

    @invariant()
    def store_sees_every_update(self):
        np.testing.assert_array_equal(self.store.lookup("t", POOL), self.expected())
        assert self.store.step("t") == self.steps
        tiers = self.store.tiers("t")
        assert tiers is not None and (tiers.host.pins == 0).all() and (tiers.device.slots.pins == 0).all()


TiersVsDict.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
test_tiers_against_a_dict = TiersVsDict.TestCase
