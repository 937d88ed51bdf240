"""``damo-hybrid demo``: logistic regression straight on the store, no cache and no model."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import InitializerConfig, OptimizerConfig, TableConfig
from ..store import EmbeddingStore


def demo(args: argparse.Namespace) -> int:
    """Logistic regression on Zipf-distributed synthetic ids, every weight in RocksDB."""
    from ..data.synthetic import zipf_keys

    rng = np.random.default_rng(args.seed)
    fields, batch = args.fields, args.batch_size
    # a hidden per-key weight decides the labels, so the model can learn them
    truth = lambda keys: ((keys % np.uint64(1000)).astype(np.float64) / 1000.0 - 0.5) * 2.0  # noqa: E731
    tmp = None if args.store else tempfile.TemporaryDirectory(prefix="damo-demo-")
    store_dir = Path(args.store) if args.store else Path(tmp.name) / "store"  # type: ignore[union-attr]
    tables = [
        TableConfig(f"f{i}", 1, initializer=InitializerConfig.zeros(), optimizer=OptimizerConfig.adagrad(lr=args.lr))
        for i in range(fields)
    ]
    if (store_dir / "meta.json").exists():
        with EmbeddingStore(store_dir, read_only=True) as existing:
            other = sorted(set(existing.tables) - {t.name for t in tables})
        if other:
            raise ValueError(f"--store {store_dir} holds other tables ({', '.join(other[:5])}): the demo would add its "
                             "own beside them; give it a new --store")
    print(f"damo-hybrid {__version__} store demo: {fields} fields, batch {batch}, {args.steps} steps, store {store_dir}")
    t0 = time.perf_counter()
    losses = []
    with EmbeddingStore(store_dir, tables) as store:
        for step in range(args.steps):
            keys = [zipf_keys(rng, batch, args.vocab, field=i) for i in range(fields)]
            logit_true = sum(truth(k) for k in keys)
            y = (rng.random(batch) < 1.0 / (1.0 + np.exp(-logit_true))).astype(np.float32)
            logit = sum(store.lookup(f"f{i}", k)[:, 0] for i, k in enumerate(keys))
            p = 1.0 / (1.0 + np.exp(-logit))
            eps = 1e-7
            losses.append(float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))))
            g = ((p - y) / batch).astype(np.float32)[:, None]
            for i, k in enumerate(keys):
                store.apply_gradients(f"f{i}", k, g)
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                print(f"  step {step:5d}  logloss {np.mean(losses[-20:]):.4f}")
        st = store.stats()
    dt = time.perf_counter() - t0
    print(f"rows stored {st.rows:,}  disk {st.disk_bytes / 2**20:.1f} MiB  hits {st.hits:,}  misses {st.misses:,}")
    print(f"samples/s {args.steps * batch / dt:,.0f}  key-updates/s {args.steps * batch * fields / dt:,.0f}")
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"logloss first 10 steps {first:.4f} -> last 10 steps {last:.4f}")
    if tmp is not None:
        tmp.cleanup()
    return 0
