"""Child process of ``test_kill_flush.py``: trains two collections over one store (table ``a``
with a device tier in host memory, table ``b`` host-only), checkpoints at step 6, and at step 12
either checkpoints again (``ref``) or arms a SIGKILL at the ``nth`` call of ``hook`` and then
flushes (``flush``) or checkpoints (``checkpoint``). Exits 0 if the hook never fired."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.nn import EmbeddingCollection, Feature

TABLES = [TableConfig("a", 4, initializer=InitializerConfig.normal(std=0.1, seed=1), optimizer=OptimizerConfig.adagrad(0.1)),
          TableConfig("b", 2, initializer=InitializerConfig.normal(std=0.1, seed=2), optimizer=OptimizerConfig.sgd(0.1))]


def arm(hook: str, nth: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` (SIGKILL) to this process at the ``nth`` call of ``module:attr`` or
    ``module:Class.method``, before the call is made; ``nth`` 0 arms nothing."""
    if nth <= 0:
        return
    mod_name, path = hook.split(":")
    owner: object = importlib.import_module(mod_name)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), sig)  # SIGKILL ends here; SIGINT/SIGTERM raise at the next instruction
        return real(*a, **k)

    setattr(owner, name, wrapper)


def main(store_dir: str, ckpts: str, mode: str, hook: str = "", nth: int = 1) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with EmbeddingStore(store_dir, TABLES) as store:
        store.cache_table("a", rows=200, device_rows=600)  # a device tier 3x the host tier: flushes in chunks
        e1 = EmbeddingCollection(store, [Feature("x", "a")], cache_mb=1e-6, device_cache_mb=1e-6,
                                 min_cache_rows=256, backend="cpu")
        e2 = EmbeddingCollection(store, [Feature("y", "b")], cache_mb=1e-6, min_cache_rows=256, backend="cpu")
        for step in range(1, 13):
            kx = rng.integers(0, 1500, 160).astype(np.uint64)
            ky = rng.integers(0, 1500, 160).astype(np.uint64)
            (e1({"x": kx})["x"].sum() * 0.01 + e2({"y": ky})["y"].pow(2).sum() * 0.01).backward()
            e1.apply_gradients()
            e2.apply_gradients()
            if step == 6:
                store.checkpoint(Path(ckpts) / "step-6")
        if mode != "ref":
            arm(hook, nth)
        if mode == "flush":
            store.flush()
        else:
            store.checkpoint(Path(ckpts) / "step-12")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(sys.argv[4:5]), *(int(x) for x in sys.argv[5:6]))
