"""Quality against bytes of compressed tables: ``damo-hybrid bench --compression``.

On each dataset DeepFM trains with the quality benchmark's protocol (same batches, epochs,
optimizers; every row behind a small host cache, through the pipeline) with the full table and,
at each compression ratio (10x, 100x, 1000x fewer rows than the full table's vocabulary), with
each method at the most rows the ratio allows:

- ``hashing``: the plain hashing trick, ``key mod (vocab / ratio)``;
- ``qr_mult``, ``qr_concat``: quotient-remainder over ``k`` complementary partitions of an id
  space of :data:`ID_SPACE` x the vocabulary (so ``key mod`` it collides for few ids), ``k`` and
  ``m`` picked to fit the ratio;
- ``binary_code``: blocks of the same id space's bits, the widest blocks that fit;
- ``double_hash``: own rows for the keys that occur most (the smallest ``min_count`` whose keys
  take half the rows), two shared partitions for the rest;
- ``dhe``: no table: a Deep Hash Embedding whose parameters (with Adam's state) take about the
  bytes of the rows the ratio allows (:func:`dhe_size`);
- ``float16``, ``bfloat16``, ``int16``: the full table with 16-bit weights (stochastic
  rounding; Adagrad's state stays float32), once per dataset: row ratio 1x, half the bytes of
  the weights.

It reports held-out AUC and logloss (means over seeds), the rows and bytes of embedding state
each run stored, and training samples/s. ``synthetic`` is the project's Criteo-like generator
with large vocabularies (its labels come from a hidden per-id model, so AUC is meaningful).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import InitializerConfig, OptimizerConfig
from ..data.synthetic import SyntheticCriteo
from ..keys.compression import CompressionConfig
from ..nn.dhe import DeepHashEmbedding
from ..nn.models import DeepFM, model_tables
from ..pipeline.trainer import Trainer
from ..rows.optimizers import state_width
from .quality import DATASETS, load_split, train_damo

__all__ = ["METHODS", "ID_SPACE", "pick_config", "run_compression_study", "synthetic_split", "missed_goals"]

log = logging.getLogger(__name__)

ID_SPACE = 64  # the compressed methods' id space, in multiples of the vocabulary
ROW_DTYPES = ("float16", "bfloat16", "int16")
METHODS = ("hashing", "qr_mult", "qr_concat", "binary_code", "double_hash", "dhe", *ROW_DTYPES)
_STD = 0.01  # the initializer's spread of a full row (as in the quality benchmark)


def pick_config(method: str, vocab: int, ratio: float, dim: int) -> CompressionConfig | None:
    """The config of ``method`` with the most stored rows at most ``vocab / ratio``; None where
    none fits (or, for a concat, none whose partitions divide ``dim``)."""
    target = max(2, int(vocab / ratio))
    if method == "hashing":
        return CompressionConfig.hashing(target)
    n = max(4, vocab * ID_SPACE)
    best: CompressionConfig | None = None
    cands: list[CompressionConfig] = []
    if method.startswith("qr"):
        op = method.split("_")[1]
        for k in range(2, 17):
            def stored(m: int, k: int = k) -> int:
                return (k - 1) * m + -(-n // m ** (k - 1))
            lo = max(2, math.ceil(n ** (1 / k)))  # about the fewest rows k partitions can have
            while lo > 2 and lo ** (k - 1) >= n:
                lo -= 1
            if lo ** (k - 1) >= n or stored(lo) > target:
                continue
            hi = lo  # past the minimum, more m means more rows: the largest m within the target
            while (hi * 2) ** (k - 1) < n and stored(hi * 2) <= target:
                hi *= 2
            top = hi * 2
            while top - hi > 1:
                mid = (hi + top) // 2
                if mid ** (k - 1) < n and stored(mid) <= target:
                    hi = mid
                else:
                    top = mid
            cands.append(CompressionConfig.qr(n, hi, op, k))
    elif method == "binary_code":
        bits = max(1, math.ceil(math.log2(n)))
        cands = [CompressionConfig.binary_code(n, b, "sum") for b in range(1, min(bits, 24) + 1)]
    else:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    for c in cands:
        if c.stored_rows <= target and (c.op != "concat" or dim % c.parts == 0):
            if best is None or c.stored_rows > best.stored_rows:
                best = c
    return best


class _SyntheticSplit:
    """A fixed number of batches of :class:`SyntheticCriteo` with the interface the quality
    protocol reads (``batch``, ``batches_per_epoch``, the fields)."""

    def __init__(self, gen: SyntheticCriteo, batches: int) -> None:
        self.gen, self.batches_per_epoch, self.batch_size = gen, batches, gen.batch_size
        self.sparse_fields, self.dense_fields = gen.sparse_fields, gen.dense_fields
        self.sparse = {f: np.concatenate([gen.batch(i).sparse[f] for i in range(batches)]) for f in gen.sparse_fields}

    def batch(self, index: int) -> Any:
        return self.gen.batch(index % self.batches_per_epoch)


def synthetic_split(batches: int = 160, batch_size: int = 1024) -> tuple[Any, Any]:
    """(train, held-out) synthetic data with large vocabularies (10^4..10^6 ids per field)."""
    kw = dict(batch_size=batch_size, seed=5, vocab_min=10**4, vocab_max=10**6, n_sparse=26, n_dense=13, signal=3.0)
    return (_SyntheticSplit(SyntheticCriteo(split=0, **kw), batches),
            _SyntheticSplit(SyntheticCriteo(split=1, **kw), max(1, batches // 4)))


def _row_bytes(width: int, weight_bytes: int = 4) -> int:
    """Bytes of one stored row's state: weights (float32 or 16-bit) and Adagrad accumulators (float32)."""
    return weight_bytes * width + 4 * state_width("adagrad", width)


def run_compression_study(data_root: str | Path, datasets: tuple[str, ...] = (*DATASETS, "synthetic"),
                          seeds: tuple[int, ...] = (0, 1, 2), ratios: tuple[float, ...] = (10, 100, 1000),
                          methods: tuple[str, ...] = METHODS, dim: int = 16, lr: float = 0.05,
                          dense_lr: float = 1e-3, hidden: tuple[int, ...] = (200, 200), cache_mb: float = 2.0,
                          synthetic_batches: int = 160, synthetic_batch_size: int = 1024,
                          log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Every dataset and seed: the full table, then each method at each ratio. Means over seeds."""
    out: dict[str, Any] = {"model": "deepfm", "dim": dim, "lr": lr, "seeds": list(seeds), "ratios": list(ratios),
                           "methods": list(methods), "id_space": ID_SPACE, "datasets": {}}
    for name in datasets:
        if name == "synthetic":
            train, held = synthetic_split(synthetic_batches, synthetic_batch_size)
            epochs = 1
        else:
            spec = DATASETS[name]
            train, held = load_split(Path(data_root), spec)
            epochs = spec.epochs
        # the full table's rows, and how often each key occurs in training
        occurrences = np.unique(np.concatenate([train.sparse[f] for f in train.sparse_fields]), return_counts=True)[1]
        vocab = len(occurrences)
        steps = epochs * train.batches_per_epoch
        samples = steps * train.batch_size
        runs: list[dict[str, Any]] = []
        plans: list[tuple[str, float, Any]] = [("full", 1.0, None)]
        plans += [(m, 1.0, None) for m in methods if m in ROW_DTYPES]
        for ratio in ratios:
            for method in (m for m in methods if m not in ROW_DTYPES):
                c = (dhe_size(vocab, ratio, dim) if method == "dhe" else double_hash_config(occurrences, ratio)
                     if method == "double_hash" else pick_config(method, vocab, ratio, dim))
                if c is None:
                    log_fn(f"{name}: {method} has no config within {ratio:g}x of {vocab:,} ids")
                    continue
                plans.append((method, ratio, c))
        with tempfile.TemporaryDirectory() as d:
            for method, ratio, c in plans:
                per_seed = [_train_one(method, c, train, held, steps, dim, lr, dense_lr, hidden, seed, Path(d),
                                       cache_mb) for seed in seeds]
                mean = {m: statistics.mean(r.get(m, 0) for r in per_seed)
                        for m in ("auc", "logloss", "seconds", "rows", "bytes", "weight_bytes")}
                describe = (f"full table, {method} weights" if method in ROW_DTYPES else "full table" if c is None
                            else f"dhe(k={c['k']}, hidden={c['hidden']})" if method == "dhe" else c.describe())
                run = {"method": method, "ratio": ratio, "describe": describe, **mean,
                       "config": c if method == "dhe" else (c.to_dict() if c is not None else None),
                       "samples_per_s": samples / mean["seconds"] if mean["seconds"] else 0.0,
                       "seeds": per_seed}
                runs.append(run)
                log_fn(f"{name} {method} {ratio:g}x: AUC {mean['auc']:.4f} logloss {mean['logloss']:.4f} "
                       f"rows {mean['rows']:,.0f} ({mean['bytes'] / 2**20:,.2f} MiB) — {describe}")
        out["datasets"][name] = {"vocab": vocab, "train_batches": train.batches_per_epoch, "epochs": epochs,
                                 "runs": runs, "goals": _goals(runs)}
    return out


def double_hash_config(occurrences: np.ndarray, ratio: float) -> CompressionConfig | None:
    """Double hashing within ``vocab / ratio`` rows: half for the own rows of the keys that occur
    most (the smallest ``min_count`` whose keys fit), half for the two shared partitions."""
    target = len(occurrences) / ratio
    for min_count in range(2, 256):
        if np.count_nonzero(occurrences >= min_count) <= target / 2:
            break
    shared = int(target / 4)
    return CompressionConfig.double_hash(shared, min_count) if shared >= 2 else None


def dhe_size(vocab: int, ratio: float, dim: int) -> dict[str, Any] | None:
    """A DHE of about the bytes of ``vocab / ratio`` rows (weights and optimizer state, as the
    tables count): ``k = h`` hash values and two hidden layers of ``h`` (at most 256), ``~2 h^2``
    parameters."""
    floats = vocab / ratio * 2 * (dim + 1)
    # Adam keeps two more floats per parameter; past 256 wide, DHE's compute (every distinct key
    # of a batch through the MLP) outgrows this benchmark: it then stores fewer bytes than asked
    h = min(256, int((floats / 3 / 2) ** 0.5))
    if h < 8:
        return None
    return {"k": h - h % 2, "hidden": [h, h]}


def _train_one(method: str, c: Any, train: Any, held: Any, steps: int, dim: int, lr: float, dense_lr: float,
               hidden: tuple[int, ...], seed: int, root: Path, cache_mb: float) -> dict[str, float]:
    """One run: held-out AUC and logloss, seconds, and the rows and bytes of embedding state."""
    if method == "dhe":
        return _train_dhe(c, train, held, steps, dim, dense_lr, hidden, seed)
    k = c.parts if c is not None and c.op == "mult" else 1
    std = _STD ** (1 / k)  # a product of k partition rows starts at a full row's spread
    dtype = method if method in ROW_DTYPES else "float32"
    tables = [dataclasses.replace(t, row_dtype=dtype) for t in model_tables(
        "deepfm", dim, OptimizerConfig.adagrad(lr), InitializerConfig.truncated_normal(std=std, seed=seed), compression=c)]
    r = train_damo(train, held, "deepfm", steps, dim, lr, dense_lr, hidden, seed, root, cache_mb, tables=tables)
    r["bytes"] = r["rows"] * _row_bytes(tables[0].dim, 4 if dtype == "float32" else 2)
    r["weight_bytes"] = r["rows"] * tables[0].dim * (4 if dtype == "float32" else 2)
    return r


def _train_dhe(c: dict[str, Any], train: Any, held: Any, steps: int, dim: int, dense_lr: float,
               hidden: tuple[int, ...], seed: int) -> dict[str, float]:
    """DeepFM over a :class:`~damo_hybrid.nn.dhe.DeepHashEmbedding`: no rows; its bytes are its
    parameters with Adam's two moments."""
    torch.manual_seed(seed)
    dhe = DeepHashEmbedding(train.sparse_fields, dim, k=c["k"], hidden=tuple(c["hidden"]), seed=seed)
    m = DeepFM(None, train.sparse_fields, len(train.dense_fields), hidden=hidden, embedding_module=dhe)
    trainer = Trainer(m, torch.optim.Adam(m.parameters(), lr=dense_lr), train.batch, held.batch)
    t0 = time.perf_counter()
    trainer.fit(steps, prefetch=True)
    dt = time.perf_counter() - t0
    a, ll = trainer.evaluate(held.batches_per_epoch)
    return {"auc": a, "logloss": ll, "seconds": dt, "rows": 0, "bytes": 3 * dhe.parameter_bytes()}


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on a curve of ``(x, y)`` points sorted by ``x``, log-linear in ``x``; below
    the first point, that point's ``y`` (a baseline with more bytes: stricter); None past the last
    point (no baseline of as many bytes)."""
    if x > points[-1][0] * 1.05:
        return None
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 1.0
            return y0 + t * (y1 - y0)
    return points[-1][1]


def _goals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's quality goals on one dataset."""
    full = next(r for r in runs if r["method"] == "full")
    g: dict[str, Any] = {}
    for r in runs:
        if r["method"] in ROW_DTYPES:  # within 0.001 AUC of float32 at half the weights' bytes
            g.setdefault("row_dtype", {})[r["method"]] = {
                "auc_gap": r["auc"] - full["auc"], "within_0.001": full["auc"] - r["auc"] <= 0.001,
                "weight_bytes_ratio": r["weight_bytes"] / full["weight_bytes"] if full["weight_bytes"] else None,
                "bytes_ratio": r["bytes"] / full["bytes"] if full["bytes"] else None}
    at10 = [r for r in runs if r["ratio"] == 10 and r["method"] != "hashing"]
    if at10:
        best = max(at10, key=lambda r: r["auc"])
        g["best_at_10x"] = {"method": best["method"], "auc_gap": best["auc"] - full["auc"],
                            "within_0.002": full["auc"] - best["auc"] <= 0.002}
    bc = [r for r in runs if r["ratio"] == 1000 and r["method"] == "binary_code"]
    if bc and full["auc"] > 0.5:
        kept = (bc[0]["auc"] - 0.5) / (full["auc"] - 0.5)
        g["binary_code_1000x_kept"] = {"fraction": kept, "at_least_0.99": kept >= 0.99}
    beats: dict[str, bool | None] = {}
    hs = sorted((x["bytes"], x["auc"]) for x in runs if x["method"] == "hashing" and x["bytes"] > 0)
    for r in runs:
        if r["method"] in ("full", "hashing", *ROW_DTYPES) or not hs:
            continue
        # the hashing trick's AUC at this run's bytes (log-linear between its runs): equal bytes, not
        # equal ratio labels (double hashing's own rows, DHE's cap and concat's narrow rows differ)
        at = _interpolate(hs, r["bytes"])
        beats[f"{r['method']}@{r['ratio']:g}x"] = None if at is None else r["auc"] > at
    g["beats_hashing"] = beats
    return g


def missed_goals(res: dict[str, Any]) -> list[str]:
    """Each goal of :func:`_goals` that a dataset's runs missed, in words (a goal that could not
    be judged, ``None``, is not missed); empty where every goal was met. ``bench --compression``
    exits 1 when this is not empty."""
    out = []
    for name, d in res.get("datasets", {}).items():
        g = d.get("goals") or {}
        for m, r in (g.get("row_dtype") or {}).items():
            if r.get("within_0.001") is False:
                out.append(f"{name}: {m} rows, AUC gap {r['auc_gap']:+.4f} beyond 0.001")
        b = g.get("best_at_10x")
        if b and b.get("within_0.002") is False:
            out.append(f"{name}: the best at 10x ({b['method']}), AUC gap {b['auc_gap']:+.4f} beyond 0.002")
        k = g.get("binary_code_1000x_kept")
        if k and k.get("at_least_0.99") is False:
            out.append(f"{name}: binary_code at 1000x keeps {k['fraction']:.3f} of the AUC above 0.5, below 0.99")
        lost = [run for run, ok in (g.get("beats_hashing") or {}).items() if ok is False]
        if lost:
            out.append(f"{name}: {', '.join(lost)} below the hashing trick's AUC at the same bytes")
    return out
