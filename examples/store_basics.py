"""The store's numpy API in one page: hash features, look up rows, step them, checkpoint, export.

    python examples/store_basics.py
"""

import tempfile
from pathlib import Path

import numpy as np

from damo_hybrid import (
    AdmissionConfig,
    EmbeddingStore,
    InitializerConfig,
    OptimizerConfig,
    ScheduleConfig,
    TableConfig,
    hash_feature,
)


def main() -> None:
    root = Path(tempfile.mkdtemp())
    tables = [
        TableConfig("user", 8, initializer=InitializerConfig.truncated_normal(std=0.01),
                    optimizer=OptimizerConfig.adagrad(lr=0.05)),
        TableConfig("ad", 8, optimizer=OptimizerConfig.adam(lr=1e-3, schedule=ScheduleConfig(kind="cosine", decay_steps=1000)),
                    admission=AdmissionConfig(min_count=2, capacity=100_000)),
    ]
    with EmbeddingStore(root / "store", tables) as store:
        users = hash_feature("user_id", ["alice", "bob", "alice"])       # uint64 (3,)
        ads = hash_feature("ad_id", [1001, 1002, 1003])
        u = store.lookup("user", users)                                  # float32 (3, 8)
        store.apply_gradients("user", users, np.full_like(u, 0.1))      # alice's two rows are summed
        store.apply_gradients("ad", ads, np.ones((3, 8), np.float32))    # seen once: not admitted yet
        print("stats:", store.stats())
        ckpt = store.checkpoint(root / "ckpt-1")
        n = store.export(root / "serving.npz")
        print("checkpoint:", ckpt, "exported rows:", n)
    with EmbeddingStore.from_checkpoint(root / "ckpt-1", root / "restored") as again:
        print("restored user rows:", again.count_rows("user"))


if __name__ == "__main__":
    main()
