"""A hypothesis state machine drives the RocksDB store and a plain dict model side by side."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.rows.initializers import RowInitializer

DIM = 3
LR = np.float32(0.25)
TABLES = [TableConfig(n, DIM, initializer=InitializerConfig.uniform(-1, 1, seed=11), optimizer=OptimizerConfig.sgd(0.25))
          for n in ("a", "b")]
POOL = [0, 1, 2, 2**32, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
keys_st = st.lists(st.sampled_from(POOL), min_size=0, max_size=10)
grad_st = st.integers(-4, 4).map(lambda x: np.float32(x / 4))


class StoreVsDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.path = self.dir / "s"
        self.store = EmbeddingStore(self.path, TABLES)
        self.model: dict[tuple[str, int], np.ndarray] = {}
        self.init = {t.name: RowInitializer(t.initializer, t.name, DIM) for t in TABLES}

    def expected(self, table: str, keys: list[int]) -> np.ndarray:
        k = np.array(keys, np.uint64)
        out = self.init[table](k) if keys else np.zeros((0, DIM), np.float32)
        for i, key in enumerate(keys):
            if (table, key) in self.model:
                out[i] = self.model[(table, key)]
        return out

    @rule(table=st.sampled_from(["a", "b"]), keys=keys_st, g=grad_st)
    def apply(self, table, keys, g):
        grads = np.stack([np.full(DIM, g * (i + 1), np.float32) for i in range(len(keys))]) if keys else np.zeros((0, DIM), np.float32)
        self.store.apply_gradients(table, np.array(keys, np.uint64), grads)
        summed: dict[int, np.ndarray] = {}
        for key, row in zip(keys, grads):
            summed[key] = summed.get(key, np.zeros(DIM, np.float32)) + row
        for key, gs in summed.items():
            cur = self.expected(table, [key])[0]
            self.model[(table, key)] = cur - LR * gs

    @rule(table=st.sampled_from(["a", "b"]), keys=keys_st)
    def lookup(self, table, keys):
        got = self.store.lookup(table, np.array(keys, np.uint64))
        np.testing.assert_array_equal(got, self.expected(table, keys))

    @rule(table=st.sampled_from(["a", "b"]), keys=keys_st)
    def delete(self, table, keys):
        self.store.delete(table, np.array(keys, np.uint64))
        for k in keys:
            self.model.pop((table, k), None)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = EmbeddingStore(self.path, TABLES)

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def checkpoint_and_restore(self):
        ck = self.dir / f"ck{np.random.default_rng().integers(1 << 30)}"
        self.store.checkpoint(ck)
        self.store.close()
        self.path = self.dir / (ck.name + "_r")
        self.store = EmbeddingStore.from_checkpoint(ck, self.path, TABLES)

    @invariant()
    def row_counts_match(self):
        for t in ("a", "b"):
            n = sum(1 for (tt, _) in self.model if tt == t)
            assert self.store.stats().table_rows[t] == n
            assert self.store.count_rows(t) == n

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreVsDict = StoreVsDict.TestCase
TestStoreVsDict.settings = settings(max_examples=25, stateful_step_count=20, deadline=None, derandomize=True)
