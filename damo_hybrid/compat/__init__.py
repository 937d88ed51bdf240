"""The seed project's Python API (Damo-Embedding v1.0.x), on damo_hybrid's store.

Scripts written against the seed's documented classes run unchanged with
``import damo_hybrid.compat as damo``::

    storage = damo.PyStorage("emb_store", 86400 * 30)
    init_p = damo.Parameters(); init_p.insert("name", "truncate_normal"); init_p.insert("stddev", 0.01)
    opt_p = damo.Parameters(); opt_p.insert("name", "adam"); opt_p.insert("gamma", 0.001)
    emb = damo.PyEmbedding(storage, damo.PyOptimizer(opt_p), damo.PyInitializer(init_p), 8, 0)
    keys = np.array([1, 2, 3], dtype=np.uint64)
    w = np.zeros(3 * 8, dtype=np.float32)
    emb.lookup(keys, w)            # fills w in place
    emb.apply_gradients(keys, g)   # g: float32 (3 * 8,)

Differences from the seed, all deliberate:

- Parameter dicts convert at once to typed configs; unknown names raise
  ``ValueError`` instead of being ignored.
- A wrong dtype or size raises ``TypeError``/``ValueError`` naming the
  argument, and nothing is written (the seed corrupts its heap there).
- Keys keep all 64 bits; the group selects a table (``group_<g>``) instead of
  being masked into the key's top 8 bits.
- Bias correction and adagrad decay count each key's own updates;
  ``PyOptimizer.call(w, g, step)`` takes ``step`` as that count (0 is read as 1,
  where the seed divides by zero).
- FTRL is the standard FTRL-proximal (the seed skips the ``n`` update when
  ``|z| <= lambda1``), and polynomial decay is the standard formula.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import clip
from ..config import (
    InitializerConfig,
    InitializerKind,
    OptimizerConfig,
    OptimizerKind,
    ScheduleConfig,
    ScheduleKind,
    StoreConfig,
    TableConfig,
    reject_unknown,
)
from ..keys.hashing import as_keys
from ..rows.admission import CountingBloomFilter
from ..rows.initializers import RowInitializer
from ..rows.optimizers import RowOptimizer
from ..storage.files import recover_dir
from ..store import EmbeddingStore
from .damo import Damo, replace_store
from .seed_format import dump_seed_format

__all__ = ["Parameters", "PyStorage", "PyInitializer", "PyOptimizer", "PyFilter", "PyEmbedding", "Damo"]


class Parameters:
    """The seed's string-keyed parameter bag."""

    def __init__(self) -> None:
        self._d: dict[str, Any] = {}

    def insert(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()
        if not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"value of {key!r} must be a str, int, float or bool, got {type(value).__name__}")
        self._d[key] = value

    def to_json(self) -> str:
        return json.dumps(self._d, sort_keys=True)

    def get(self, key: str, default: Any = None) -> Any:
        return self._d.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._d

    def __repr__(self) -> str:
        return f"Parameters({self.to_json()})"


def _params(p: Parameters | dict[str, Any] | None, what: str) -> dict[str, Any]:
    if p is None:
        return {}
    if isinstance(p, Parameters):
        return dict(p._d)
    if isinstance(p, dict):
        return dict(p)
    raise TypeError(f"{what} must be a Parameters or dict, got {type(p).__name__}")


def _take(d: dict[str, Any], allowed: dict[str, Any], what: str) -> dict[str, Any]:
    """The parameters ``allowed`` names (name -> default) from ``d``, each of its default's type.

    The config dataclasses' rules, never a conversion: a number parameter (a float default, or
    required) takes an int or a float, not text or a bool; an int parameter only an int (not
    7.5, not True); a switch only a bool; a path only text. numpy scalars count as their Python
    type.

    Raises:
        ValueError: an unknown or missing parameter, or a value of another type (one line naming
            the parameter and the value).
    """
    reject_unknown(f"{what} parameters", set(d) - {"name"}, allowed)
    out = {}
    for k, default in allowed.items():
        v = d.get(k, default)
        if v is _REQUIRED:
            raise ValueError(f"{what} parameter {k!r} is required")
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(default, bool):
            ok, want = isinstance(v, bool), "a bool (True or False)"
        elif isinstance(default, int):
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an int"
        elif isinstance(default, str):
            ok, want = isinstance(v, (str, os.PathLike)), "a path (text)"
        else:  # a float default, or required: a number
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number (int or float)"
            v = float(v) if ok else v
        if not ok:
            raise ValueError(f"{what} parameter {k!r} must be {want}, got {clip(v)} ({type(v).__name__})")
        out[k] = v
    return out


_REQUIRED = object()

_INIT = {
    "zeros": (InitializerKind.ZEROS, {}),
    "ones": (InitializerKind.ONES, {}),
    "random_uniform": (InitializerKind.UNIFORM, {"min": -1.0, "max": 1.0}),
    "random_normal": (InitializerKind.NORMAL, {"mean": 0.0, "stddev": 1.0}),
    "truncate_normal": (InitializerKind.TRUNCATED_NORMAL, {"mean": 0.0, "stddev": 1.0}),
}


def initializer_config(params: Parameters | dict[str, Any]) -> InitializerConfig:
    """Seed initializer parameters -> :class:`InitializerConfig`."""
    d = _params(params, "initializer params")
    name = d.get("name")
    if name not in _INIT:
        raise ValueError(f"initializer name must be one of {sorted(_INIT)}, got {name!r}")
    kind, allowed = _INIT[name]
    v = _take(d, {**allowed, "seed": 0}, f"{name} initializer")
    return InitializerConfig(kind=kind, low=v.get("min", -0.01), high=v.get("max", 0.01),
                             mean=v.get("mean", 0.0), std=v.get("stddev", 0.01), seed=v["seed"])


_SCHED = {
    "exponential_decay": ScheduleKind.EXPONENTIAL,
    "polynomial_decay": ScheduleKind.POLYNOMIAL,
    "nature_exponential_decay": ScheduleKind.NATURAL_EXPONENTIAL,
    "natural_exponential_decay": ScheduleKind.NATURAL_EXPONENTIAL,
    "inverse_time_lr_scheduler": ScheduleKind.INVERSE_TIME,
    "inverse_time_decay": ScheduleKind.INVERSE_TIME,
    "cosine_decay": ScheduleKind.COSINE,
    "liner_cosine_decay": ScheduleKind.LINEAR_COSINE,
    "linear_cosine_decay": ScheduleKind.LINEAR_COSINE,
}


def schedule_config(params: Parameters | dict[str, Any] | None) -> ScheduleConfig:
    """Seed scheduler parameters -> :class:`ScheduleConfig` (empty name: constant)."""
    d = _params(params, "scheduler params")
    name = d.get("name", "")
    if name in ("", None):
        return ScheduleConfig()
    if name not in _SCHED:
        raise ValueError(f"scheduler name must be one of {sorted(_SCHED)} or empty, got {name!r}")
    v = _take(d, {"decay_steps": _REQUIRED, "decay_rate": 0.96, "end_learning_rate": 0.0001, "power": 1.0,
                  "alpha": 0.0, "beta": 0.001, "num_periods": 0.5}, f"{name} scheduler")
    return ScheduleConfig(kind=_SCHED[name], decay_steps=v["decay_steps"], decay_rate=v["decay_rate"],
                          end_lr=v["end_learning_rate"], power=v["power"], alpha=v["alpha"], beta=v["beta"],
                          num_periods=v["num_periods"])


def optimizer_config(params: Parameters | dict[str, Any], scheduler: Parameters | dict[str, Any] | None = None) -> OptimizerConfig:
    """Seed optimizer (+ scheduler) parameters -> :class:`OptimizerConfig`."""
    d = _params(params, "optimizer params")
    name = d.get("name")
    sch = schedule_config(scheduler)
    if name == "sgd":
        v = _take(d, {"gamma": 0.001, "lambda": 0.0}, "sgd optimizer")
        return OptimizerConfig(kind=OptimizerKind.SGD, lr=v["gamma"], weight_decay=v["lambda"], schedule=sch)
    if name == "adagrad":
        v = _take(d, {"gamma": 0.01, "lambda": 0.0, "eta": 0.0, "epsilon": 1e-10}, "adagrad optimizer")
        return OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=v["gamma"], weight_decay=v["lambda"],
                               lr_decay=v["eta"], eps=v["epsilon"], schedule=sch)
    if name in ("adam", "adamw"):
        v = _take(d, {"gamma": 0.001, "beta1": 0.9, "beta2": 0.999, "lambda": 0.0, "epsilon": 1e-8}, f"{name} optimizer")
        return OptimizerConfig(kind=OptimizerKind(name), lr=v["gamma"], beta1=v["beta1"], beta2=v["beta2"],
                               weight_decay=v["lambda"], eps=v["epsilon"], schedule=sch)
    if name == "ftrl":
        # the seed's Optimizer doc names FTRL's learning rate (alpha) "gamma"; its code reads "alpha"
        if "gamma" in d and "alpha" in d:
            raise ValueError("ftrl optimizer: give its learning rate once, as 'gamma' (or 'alpha'), not both")
        if "gamma" in d:
            d["alpha"] = d.pop("gamma")
        v = _take(d, {"alpha": 0.005, "beta": 0.0, "lambda1": 0.0, "lambda2": 0.0}, "ftrl optimizer")
        return OptimizerConfig(kind=OptimizerKind.FTRL, lr=v["alpha"], ftrl_beta=v["beta"], l1=v["lambda1"],
                               l2=v["lambda2"], schedule=sch)
    if name == "lion":
        v = _take(d, {"eta": 0.0003, "beta1": 0.9, "beta2": 0.99, "lambda": 0.01}, "lion optimizer")
        return OptimizerConfig(kind=OptimizerKind.LION, lr=v["eta"], beta1=v["beta1"], beta2=v["beta2"],
                               weight_decay=v["lambda"], schedule=sch)
    raise ValueError(f"optimizer name must be one of ['adagrad', 'adam', 'adamw', 'ftrl', 'lion', 'sgd'], got {name!r}")


def _f32_vector(x: Any, name: str, size: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy float32 array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if size is not None and x.size != size:
        raise ValueError(f"{name} must have {size} elements, got {x.size}")
    return x


def _writable(x: np.ndarray, name: str) -> None:
    if not x.flags.writeable:
        raise ValueError(f"{name} must be writeable (it is filled in place)")


class PyInitializer:
    """``call(w)`` fills a float32 vector with initial values, in place.

    Successive calls draw successive rows of the deterministic generator.
    """

    def __init__(self, params: Parameters | dict[str, Any]) -> None:
        self.config = initializer_config(params)
        self._calls = 0

    def call(self, w: np.ndarray) -> None:
        _f32_vector(w, "w")
        _writable(w, "w")
        if w.size == 0:
            return
        row = RowInitializer(self.config, "compat", w.size)(np.array([self._calls], np.uint64))
        self._calls += 1
        w[:] = row[0]


class PyOptimizer:
    """``call(w, g[, step])`` updates one row in place.

    ``g`` holds ``dim`` gradients; ``w`` holds the weights followed by the
    optimizer state, as in the seed: ``dim`` (sgd), ``2 dim`` (adagrad, lion),
    ``3 dim`` (adam, adamw, ftrl).
    """

    def __init__(self, params: Parameters | dict[str, Any], scheduler_params: Parameters | dict[str, Any] | None = None) -> None:
        self.config = optimizer_config(params, scheduler_params)

    def call(self, w: np.ndarray, g: np.ndarray, step: int = 0) -> None:
        _f32_vector(g, "g")
        dim = g.size
        opt = RowOptimizer(self.config, dim)
        _f32_vector(w, "w", dim + opt.width)
        _writable(w, "w")
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {clip(step)}")
        if not np.isfinite(g).all():
            raise ValueError("g holds NaN or Inf; nothing was updated")
        ww = w[:dim].reshape(1, dim).copy()
        st = w[dim:].reshape(1, opt.width).copy()
        opt.update(ww, st, g.reshape(1, dim), np.array([max(int(step), 1)]), opt.lr(int(step)))
        w[:dim] = ww[0]
        w[dim:] = st[0]


class PyFilter:
    """Counting Bloom filter: ``add(key, n)`` then ``check(key)`` (count >= ``count``).

    Params (the seed's CBF page): ``capacity`` (default 2**28 in the seed; 2**20 here),
    ``fpr`` (default 1e-3), ``count`` (the admission threshold, default 15), ``path`` (the
    counters' file, default ``/tmp/COUNTING_BLOOM_FILTER_DATA``) and ``reload`` (default true).
    As in the seed, the counters live in that file through ``mmap``, so every ``add`` reaches it
    without a save call and survives a crash; with ``reload`` false, or no file there yet, it
    starts from zero. A file of another size (another capacity or fpr) raises ``ValueError``.
    """

    DEFAULT_PATH = "/tmp/COUNTING_BLOOM_FILTER_DATA"

    def __init__(self, params: Parameters | dict[str, Any] | None = None) -> None:
        d = _params(params, "filter params")
        v = _take(d, {"capacity": 1 << 20, "fpr": 1e-3, "count": 15, "path": self.DEFAULT_PATH, "reload": True},
                  "filter")
        self.min_count = v["count"]
        if self.min_count < 1:
            raise ValueError(f"count must be >= 1, got {self.min_count}")
        f = CountingBloomFilter(v["capacity"], v["fpr"])
        self.path = Path(str(v["path"]))
        if v["reload"] and self.path.is_file():
            size = self.path.stat().st_size
            if size != f.m:
                raise ValueError(f"filter file {self.path} holds {size} counters, this capacity and fpr need {f.m}: "
                                 "give the capacity and fpr it was made with, or reload=False to start over")
            mode = "r+"
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            mode = "w+"
        f.counters = np.memmap(self.path, dtype=np.uint8, mode=mode, shape=(f.m,))
        self._f = f

    def flush(self) -> None:
        """Force the counters to disk now (the kernel writes them back on its own too)."""
        self._f.counters.flush()  # type: ignore[attr-defined]

    @staticmethod
    def _keys(key: Any) -> np.ndarray:
        if isinstance(key, np.ndarray):
            return as_keys(key.reshape(-1) if key.ndim == 0 else key, "key")
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not -(2**63) <= int(key) < 2**64:
                raise ValueError(f"key must fit in 64 bits, got {key}")
            return np.array([int(key) & 0xFFFFFFFFFFFFFFFF], np.uint64)
        raise TypeError(f"key must be an int or a uint64 array, got {type(key).__name__}")

    def add(self, key: Any, n: int = 1) -> None:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {clip(n)}")
        self._f.add(np.unique(self._keys(key)), int(n))

    def check(self, key: Any) -> bool | np.ndarray:
        ok = self._f.count(self._keys(key)) >= self.min_count
        return bool(ok[0]) if not isinstance(key, np.ndarray) else ok


class PyStorage:
    """A store directory; ``ttl`` seconds > 0 turns on RocksDB TTL.

    ``allow_config_change`` (not in the seed) lets a :class:`PyEmbedding` of an existing group
    change its optimizer settings or initializer (logged); by default that raises
    ``ConfigConflictError``, so two embeddings on one group cannot silently disagree."""

    def __init__(self, dir: str, ttl: int = 0, *, allow_config_change: bool = False) -> None:
        if isinstance(ttl, (bool, np.bool_)) or not isinstance(ttl, (int, np.integer)) or ttl < 0:
            raise ValueError(f"ttl must be an int >= 0 (seconds; 0 = no TTL), got {clip(ttl)}")
        self.dir = Path(dir)
        self._cfg = StoreConfig(ttl_seconds=int(ttl) if ttl else None, allow_config_change=allow_config_change)
        recover_dir(self.dir)  # a load_from_checkpoint killed inside its swap left the old store aside
        self.store = EmbeddingStore(self.dir, config=self._cfg)

    def dump(self, path: str, cond: Parameters | dict[str, Any] | None = None) -> None:
        """Write rows in the seed's binary format; ``cond`` may hold
        ``expire_days``, ``min_count`` and ``group``."""
        v = _take(_params(cond, "dump condition"), {"expire_days": 0.0, "min_count": 0, "group": -1}, "dump")
        group = v["group"]
        if group >= 256:
            raise ValueError(f"group must be in [0, 256), got {group}")
        name = f"group_{group}"
        # a group without a table dumps nothing: an empty, valid file
        tables = None if group < 0 else ([name] if name in self.store.tables else [])
        dump_seed_format(self.store, path, tables=tables, min_count=v["min_count"],
                         expire_days=v["expire_days"] or None)

    def checkpoint(self, path: str) -> None:
        self.store.checkpoint(path)

    def close(self) -> None:
        """Flush and release the store (and its lock); closing twice is a no-op."""
        self.store.close()

    def __enter__(self) -> PyStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load_from_checkpoint(self, path: str) -> None:
        """Replace this storage's contents with a checkpoint's (the copy is swapped in whole: an
        interrupted restore leaves the old store or the new one, never a mix or an empty one)."""
        replace_store(self, Path(path))


class PyEmbedding:
    """One group's table with in-place ``lookup(keys, w)`` and ``apply_gradients(keys, g)``."""

    def __init__(self, storage: PyStorage, optimizer: PyOptimizer, initializer: PyInitializer, dim: int, group: int = 0) -> None:
        if not isinstance(storage, PyStorage):
            raise TypeError(f"storage must be a PyStorage, got {type(storage).__name__}")
        if not isinstance(optimizer, PyOptimizer):
            raise TypeError(f"optimizer must be a PyOptimizer, got {type(optimizer).__name__}")
        if not isinstance(initializer, PyInitializer):
            raise TypeError(f"initializer must be a PyInitializer, got {type(initializer).__name__}")
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {clip(dim)}")
        if isinstance(group, (bool, np.bool_)) or not isinstance(group, (int, np.integer)) or not 0 <= group < 256:
            raise ValueError(f"group must be an int in [0, 256), got {clip(group)}")
        self.storage, self.dim, self.group = storage, int(dim), int(group)
        self.table = f"group_{self.group}"
        storage.store.add_table(TableConfig(self.table, self.dim, initializer=initializer.config,
                                            optimizer=optimizer.config))

    def lookup(self, keys: np.ndarray, w: np.ndarray) -> None:
        """keys: uint64 (N,); w: float32 (N * dim,), filled in place."""
        keys = as_keys(keys)
        _f32_vector(w, "w", len(keys) * self.dim)
        _writable(w, "w")
        w[:] = self.storage.store.lookup(self.table, keys).reshape(-1)

    def apply_gradients(self, keys: np.ndarray, g: np.ndarray) -> None:
        """keys: uint64 (N,); g: float32 (N * dim,)."""
        keys = as_keys(keys)
        _f32_vector(g, "g", len(keys) * self.dim)
        self.storage.store.apply_gradients(self.table, keys, g.reshape(len(keys), self.dim))
