"""Quality parity on real data: damo_hybrid against the same model with in-memory torch embeddings.

For each dataset both sides train the same architecture (DeepFM by default) with the same
seed, batches, epochs and optimizers (Adagrad on the sparse rows, Adam on the dense layers):

- **damo_hybrid**: every row in a RocksDB store behind a host cache, trained through the
  three-stage pipeline (:class:`~damo_hybrid.trainer.Trainer` with prefetch);
- **in-memory**: the very same dense modules, with the sparse rows in ``nn.Embedding(sparse=True)``
  tables indexed by the exact vocabulary of the data (no hash collisions), initialised with the
  same rows the store's initializer gives each key, and ``torch.optim.Adagrad``.

Both report held-out AUC and logloss; the goal is damo_hybrid within 0.005 AUC of the in-memory
model on every dataset, averaged over seeds. The data files are read from ``data_root`` (they
are research-only and never shipped with the project).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import InitializerConfig, OptimizerConfig, TableConfig
from ..data.metrics import auc, logloss
from ..data.readers import read_dataset
from ..data.tabular import TabularData
from ..nn.models import MODELS, model_tables
from ..pipeline.trainer import Trainer
from ..rows.initializers import RowInitializer
from ..store import EmbeddingStore
from .baseline import InMemoryEmbeddings, train_in_memory, vocab_index

__all__ = ["DATASETS", "DatasetSpec", "run_quality", "load_split", "train_damo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files lie under the data root and how to train on it."""

    fmt: str
    train: tuple[str, ...]
    eval: tuple[str, ...] = ()
    eval_fraction: float = 0.0  # without eval files: a fixed random split of the train files
    epochs: int = 2
    batch_size: int = 512


DATASETS: dict[str, DatasetSpec] = {
    "criteo": DatasetSpec("criteo", ("criteo_dac_head8k/criteo_train.tsv.gz",),
                          ("criteo_dac_head8k/criteo_dev.tsv.gz", "criteo_dac_head8k/criteo_test.tsv.gz"),
                          epochs=2, batch_size=256),
    "avazu": DatasetSpec("avazu", ("avazu_head9k/avazu_train.csv.gz",),
                         ("avazu_head9k/avazu_dev.csv.gz", "avazu_head9k/avazu_test.csv.gz"), epochs=2, batch_size=256),
    "movielens": DatasetSpec("movielens", ("movielens_100k/u.data.gz",), eval_fraction=0.2, epochs=2, batch_size=1024),
    "frappe": DatasetSpec("libfm", ("frappe_nfm/frappe.validation.libfm.gz",), ("frappe_nfm/frappe.test.libfm.gz",),
                          epochs=3, batch_size=1024),
}


def _concat(parts: list[TabularData]) -> TabularData:
    first = parts[0]
    return TabularData(first.path, first.batch_size,
                       {f: np.concatenate([p.sparse[f] for p in parts]) for f in first.sparse},
                       np.concatenate([p.dense for p in parts]), np.concatenate([p.label for p in parts]),
                       list(first.dense_fields))


def load_split(root: Path, spec: DatasetSpec) -> tuple[TabularData, TabularData]:
    """(train, held-out) of a dataset; the split does not depend on the training seed."""
    train = _concat([read_dataset(root / f, spec.fmt, spec.batch_size) for f in spec.train])
    if spec.eval:
        return train, _concat([read_dataset(root / f, spec.fmt, spec.batch_size) for f in spec.eval])
    order = np.random.default_rng(12345).permutation(train.n)
    n_eval = int(round(spec.eval_fraction * train.n))
    return train.take(np.sort(order[n_eval:])), train.take(np.sort(order[:n_eval]))


def _tables(model: str, dim: int, lr: float, seed: int) -> list[TableConfig]:
    return model_tables(model, dim, OptimizerConfig.adagrad(lr), InitializerConfig.truncated_normal(std=0.01, seed=seed))


def _build(model: str, store: EmbeddingStore, data: TabularData, hidden: tuple[int, ...], seed: int,
           cache_mb: float) -> nn.Module:
    torch.manual_seed(seed)  # both sides build their dense modules from the same seed
    kw: dict[str, Any] = {"hidden": hidden} if model in ("deepfm", "wide_deep", "dcn") else {"top": hidden}
    # the in-memory side runs on the CPU: so does this one (parity, not speed)
    return MODELS[model](store, data.sparse_fields, len(data.dense_fields), cache_mb=cache_mb, backend="cpu", **kw)


def _evaluate(predict, held: TabularData) -> tuple[float, float]:
    ys, ps = [], []
    for i in range(held.batches_per_epoch):
        b = held.batch(i)
        ys.append(b.label)
        ps.append(predict(b))
    y, p = np.concatenate(ys), np.concatenate(ps)
    return auc(y, p), logloss(y, p)


def train_damo(train: TabularData, held: TabularData, model: str, steps: int, dim: int, lr: float,
               dense_lr: float, hidden: tuple[int, ...], seed: int, root: Path, cache_mb: float,
               tables: list[TableConfig] | None = None) -> dict[str, float]:
    """Train through the store, host cache and pipeline; held-out AUC and logloss, and the rows
    stored (``tables``: instead of the model's default layout)."""
    tables = tables or _tables(model, dim, lr, seed)
    with EmbeddingStore(root / f"store-{seed}-{time.monotonic_ns()}", tables) as store:
        m = _build(model, store, train, hidden, seed, cache_mb)
        trainer = Trainer(m, torch.optim.Adam(m.parameters(), lr=dense_lr), train.batch, held.batch)
        t0 = time.perf_counter()
        trainer.fit(steps, prefetch=True)
        dt = time.perf_counter() - t0
        a, ll = trainer.evaluate(held.batches_per_epoch)
        rows = store.stats().rows
    return {"auc": a, "logloss": ll, "seconds": dt, "rows": rows}


def train_torch(train: TabularData, held: TabularData, model: str, steps: int, dim: int, lr: float,
                dense_lr: float, hidden: tuple[int, ...], seed: int) -> dict[str, float]:
    """The same model with every row in ``nn.Embedding(sparse=True)`` and ``torch.optim.Adagrad``."""
    vocab = np.unique(np.concatenate([d.sparse[f] for d in (train, held) for f in d.sparse_fields]))
    emb_cfg = _tables(model, dim, lr, seed)[0]
    # the rows the store would start from (the embedding columns of them)
    init = RowInitializer(emb_cfg.initializer, emb_cfg.name, emb_cfg.dim, emb_cfg.linear_column)(vocab)[:, :dim]
    rows = InMemoryEmbeddings(train.sparse_fields, len(vocab), dim, vocab_index(vocab),
                              lin=model in ("deepfm", "wide_deep"), init=init)
    torch.manual_seed(seed)  # after the tables (their constructor draws): the same dense modules as the damo side
    kw: dict[str, Any] = {"hidden": hidden} if model in ("deepfm", "wide_deep", "dcn") else {"top": hidden}
    m = MODELS[model](None, train.sparse_fields, len(train.dense_fields), embedding_module=rows, **kw)
    t0 = time.perf_counter()
    train_in_memory(m, train.batch, steps, lr, dense_lr)
    dt = time.perf_counter() - t0
    m.eval()
    with torch.no_grad():
        a, ll = _evaluate(lambda b: torch.sigmoid(m(m.prepare(b.sparse), torch.from_numpy(b.dense))).numpy(), held)
    return {"auc": a, "logloss": ll, "seconds": dt}


def run_quality(data_root: str | Path, datasets: tuple[str, ...] = tuple(DATASETS), seeds: tuple[int, ...] = (0, 1, 2),
                model: str = "deepfm", dim: int = 16, lr: float = 0.05, dense_lr: float = 1e-3,
                hidden: tuple[int, ...] = (200, 200), cache_mb: float = 2.0, epochs: int | None = None,
                log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train both sides on every dataset and seed; per-dataset means and the AUC gap.

    ``cache_mb`` is deliberately small so the host cache evicts during the damo_hybrid runs.
    """
    root = Path(data_root)
    out: dict[str, Any] = {"model": model, "dim": dim, "lr": lr, "dense_lr": dense_lr, "hidden": list(hidden),
                           "seeds": list(seeds), "cache_mb": cache_mb, "datasets": {}}
    for name in datasets:
        spec = DATASETS[name]
        train, held = load_split(root, spec)
        n_epochs = epochs or spec.epochs
        steps = n_epochs * train.batches_per_epoch
        runs = []
        with tempfile.TemporaryDirectory() as d:
            for seed in seeds:
                dm = train_damo(train, held, model, steps, dim, lr, dense_lr, hidden, seed, Path(d), cache_mb)
                im = train_torch(train, held, model, steps, dim, lr, dense_lr, hidden, seed)
                runs.append({"seed": seed, "damo": dm, "in_memory": im})
                log_fn(f"{name} seed {seed}: damo AUC {dm['auc']:.4f} logloss {dm['logloss']:.4f} | "
                       f"in-memory AUC {im['auc']:.4f} logloss {im['logloss']:.4f}")
        mean = {side: {k: statistics.mean(r[side][k] for r in runs) for k in ("auc", "logloss", "seconds")}
                for side in ("damo", "in_memory")}
        gap = mean["damo"]["auc"] - mean["in_memory"]["auc"]
        out["datasets"][name] = {"train_rows": train.n, "eval_rows": held.n, "epochs": n_epochs, "steps": steps,
                                 "batch_size": spec.batch_size, "runs": runs, "mean": mean, "auc_gap": gap,
                                 "within_0.005": abs(gap) <= 0.005}
        log_fn(f"{name}: mean AUC damo {mean['damo']['auc']:.4f} vs in-memory {mean['in_memory']['auc']:.4f} "
               f"(gap {gap:+.5f}); logloss {mean['damo']['logloss']:.4f} vs {mean['in_memory']['logloss']:.4f}")
    return out
