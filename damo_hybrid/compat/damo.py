"""The seed's current core (Damo-Embedding 1.1/1.2): ``damo.Damo(config_file)``, on damo_hybrid's store.

A script that says ``import damo`` runs with ``import damo_hybrid.compat as damo``::

    d = damo.Damo("config.json")     # {"dir": ..., "ttl": ..., "embeddings": [{dim, group, initializer, optimizer}]}
    w = np.zeros(len(keys) * dim, np.float32)
    d.pull(0, keys, w)               # keys int64 (N,); w filled in place
    d.push(0, keys, grads)           # grads float32 (N * dim,)
    d.checkpoint("ckpt.bin"); d.load("ckpt.bin"); d.dump("dump.bin")

The seed's 1.2 settings are kept: initializers ``zeros``, ``uniform`` (U(+-sqrt(1/dim))),
``random`` (normal, ``mean`` 0 and ``stddev`` 1 by default) and ``xavier`` (U(+-sqrt(6/dim)));
the optimizer ``adamw`` with ``gamma`` (1e-3), ``beta1`` (0.9), ``beta2`` (0.999), ``lambda``
(0.01, decoupled weight decay) and ``epsilon`` (1e-8), bias-corrected by each key's own update
count. Key 0 is the padding key: ``pull`` writes zeros for it and ``push`` ignores it.

Deliberate differences (also in ``docs/migration.md``):

- the 1.0 initializer and optimizer names (``truncate_normal``, ``adam``, ``ftrl`` ...) work too;
- ``push`` sums the gradients of a key repeated in one call and steps it once (the seed steps it
  once per occurrence);
- ``pull`` of a key never pushed returns its initial row without storing it (the seed stores
  it): rows are a pure function of (seed, group, key), so the values are the same;
- ``checkpoint(path)`` writes one file in damo_hybrid's format (a tar of an atomic store
  checkpoint: weights, optimizer state and step counters); ``load`` reads those, not the seed's
  raw RocksDB records;
- the config may be given as a dict as well as a file path, and :meth:`Damo.close` (or ``with``)
  releases the store.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..config import (
    InitializerConfig,
    OptimizerConfig,
    OptimizerKind,
    StoreConfig,
    TableConfig,
    reject_unknown,
)
from ..errors import DamoHybridError, UnknownTableError
from ..storage.files import atomic_file, fsync_dir
from ..storage.meta import read_meta
from ..store import EmbeddingStore
from .seed_format import dump_seed_format

__all__ = ["Damo", "damo_initializer", "damo_optimizer"]

_V12_INIT = ("zeros", "uniform", "random", "xavier")


def damo_initializer(params: dict[str, Any], dim: int) -> InitializerConfig:
    """A seed 1.2 initializer dict (or a 1.0 one) -> :class:`InitializerConfig`."""
    from . import initializer_config  # the 1.0 names

    name = params.get("name", "zeros")
    if name not in _V12_INIT:
        return initializer_config(params)
    if name == "zeros":
        reject_unknown("zeros initializer parameters", set(params) - {"name"}, ())
        return InitializerConfig.zeros()
    if name == "random":
        reject_unknown("random initializer parameters", set(params) - {"name"}, ("mean", "stddev"))
        std = float(params.get("stddev", 1.0))
        if not std > 0:
            raise ValueError(f"random initializer: stddev must be > 0, got {std}")
        return InitializerConfig.normal(mean=float(params.get("mean", 0.0)), std=std)
    reject_unknown(f"{name} initializer parameters", set(params) - {"name"}, ())
    b = math.sqrt((1.0 if name == "uniform" else 6.0) / dim)
    return InitializerConfig.uniform(-b, b)


def damo_optimizer(params: dict[str, Any]) -> OptimizerConfig:
    """A seed 1.2 optimizer dict (``adamw``, or a 1.0 name) -> :class:`OptimizerConfig`."""
    from . import optimizer_config  # the 1.0 names

    name = params.get("name", "adamw")
    if name != "adamw":
        return optimizer_config(params)
    reject_unknown("adamw optimizer parameters", set(params) - {"name"}, ("gamma", "beta1", "beta2", "lambda", "epsilon"))
    v = {"gamma": 0.001, "beta1": 0.9, "beta2": 0.999, "lambda": 0.01, "epsilon": 1e-8}
    v.update({k: float(params[k]) for k in v if k in params})
    return OptimizerConfig(kind=OptimizerKind.ADAMW, lr=v["gamma"], beta1=v["beta1"], beta2=v["beta2"],
                           weight_decay=v["lambda"], eps=v["epsilon"])


def _table(group: int) -> str:
    return f"group_{group}"


class Damo:
    """The seed's ``damo.Damo``: embedding groups in one store.

    Args:
        config_file: path of the JSON config, or the config as a dict: ``dir`` (the store
            directory), ``ttl`` (seconds; 0 or absent: rows never expire) and ``embeddings``, a
            list of ``{dim, group, initializer: {name, ...}, optimizer: {name, ...}}``.
    Raises:
        ValueError: a bad config (it names the field); ``FileNotFoundError``: no such file.
    """

    def __init__(self, config_file: str | os.PathLike[str] | dict[str, Any]) -> None:
        if isinstance(config_file, dict):
            cfg = dict(config_file)
        else:
            with open(config_file, encoding="utf-8") as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"config file {config_file} is not valid JSON: {e}") from e
        reject_unknown("Damo config fields", set(cfg), ("dir", "ttl", "embeddings"))
        if "dir" not in cfg or "embeddings" not in cfg:
            raise ValueError("a Damo config needs 'dir' and 'embeddings'")
        ttl = cfg.get("ttl", 0)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
            raise ValueError(f"ttl must be an int >= 0 (seconds; 0: no expiry), got {ttl!r}")
        self.dims: dict[int, int] = {}
        tables = []
        for i, e in enumerate(cfg["embeddings"]):
            if not isinstance(e, dict):
                raise ValueError(f"embeddings[{i}] must be an object, got {e!r}")
            reject_unknown(f"embeddings[{i}] fields", set(e), ("dim", "group", "initializer", "optimizer"))
            dim, group = e.get("dim"), e.get("group")
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise ValueError(f"embeddings[{i}].dim must be an int >= 1, got {dim!r}")
            if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < 256:
                raise ValueError(f"embeddings[{i}].group must be an int in [0, 256), got {group!r}")
            if group in self.dims:
                raise ValueError(f"group {group} appears twice in embeddings")
            self.dims[group] = dim
            tables.append(TableConfig(_table(group), dim, initializer=damo_initializer(dict(e.get("initializer") or {}), dim),
                                      optimizer=damo_optimizer(dict(e.get("optimizer") or {}))))
        self.dir = Path(cfg["dir"])
        self.ttl = ttl
        self._cfg = StoreConfig(ttl_seconds=ttl or None)
        self._tables = tables
        self.store = EmbeddingStore(self.dir, tables, self._cfg)

    # ------------------------------------------------------------------ rows
    def _group(self, group: int) -> int:
        if not isinstance(group, (int, np.integer)) or int(group) not in self.dims:
            raise UnknownTableError(f"unknown group {group!r}; this Damo has groups {sorted(self.dims)}")
        return int(group)

    @staticmethod
    def _keys(keys: Any) -> np.ndarray:
        if not isinstance(keys, np.ndarray) or keys.dtype.kind not in "iu" or keys.dtype.itemsize != 8:
            raise TypeError(f"keys must be a numpy int64 (or uint64) array, got "
                            f"{type(keys).__name__ if not isinstance(keys, np.ndarray) else keys.dtype}")
        if keys.ndim != 1:
            raise ValueError(f"keys must be 1-D, got shape {keys.shape}")
        return np.ascontiguousarray(keys).view(np.uint64)  # int64 ids keep their 64 bits

    @staticmethod
    def _buffer(x: Any, name: str, n: int, dim: int) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise TypeError(f"{name} must be a numpy float32 array, got "
                            f"{type(x).__name__ if not isinstance(x, np.ndarray) else x.dtype}")
        if x.size != n * dim or not (x.ndim == 1 or x.shape == (n, dim)):
            raise ValueError(f"{name} must have shape ({n * dim},) or ({n}, {dim}) for {n} keys of dim {dim}, got {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        return x.reshape(n, dim)

    def pull(self, group: int, keys: np.ndarray, weights: np.ndarray) -> None:
        """Write the rows of ``keys`` into ``weights`` (float32 (N * dim,) or (N, dim)), in place.

        Args:
            group: the embedding group.
            keys: int64 (N,); key 0 is padding and reads as zeros.
        """
        g = self._group(group)
        k = self._keys(keys)
        w = self._buffer(weights, "weights", len(k), self.dims[g])
        if not weights.flags.writeable:
            raise ValueError("weights must be writeable (it is filled in place)")
        rows = self.store.lookup(_table(g), k)
        rows[k == 0] = 0.0
        w[...] = rows

    def push(self, group: int, keys: np.ndarray, gradients: np.ndarray) -> None:
        """Step the rows of ``keys`` with ``gradients`` (float32 (N * dim,) or (N, dim)).

        A key given twice has its gradients summed and is stepped once; key 0 is ignored.

        Raises:
            NonFiniteGradientError: a NaN/Inf gradient; nothing was written.
        """
        g = self._group(group)
        k = self._keys(keys)
        grads = self._buffer(gradients, "gradients", len(k), self.dims[g])
        keep = k != 0
        if not keep.all():
            k, grads = k[keep], grads[keep]
        if len(k):
            self.store.apply_gradients(_table(g), k, grads)

    # ------------------------------------------------------------- files
    def dump(self, path: str | os.PathLike[str]) -> None:
        """Every group's weights in the seed's 1.2 binary dump format (what its inference export
        reads; see :mod:`~damo_hybrid.compat.seed_format`)."""
        dump_seed_format(self.store, str(path), layout="1.2")

    def checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write every row (weights, optimizer state) and step counter to one file, atomically:
        a crash leaves the previous file (or none), never a partial one."""
        path = Path(path)
        with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
            ck = self.store.checkpoint(Path(tmp) / "checkpoint")
            with atomic_file(path) as f, tarfile.open(fileobj=f, mode="w") as tar:
                tar.add(ck, arcname="checkpoint")

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace every row with those of a file :meth:`checkpoint` wrote.

        Raises:
            FileNotFoundError: no such file.
            DamoHybridError: not a checkpoint of this kind (a seed checkpoint file, say); nothing changed.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file {path}")
        if not tarfile.is_tarfile(path):
            raise DamoHybridError(f"{path} is not a damo_hybrid checkpoint file (the seed's own checkpoint "
                                  "files hold its raw RocksDB records and are not read here)")
        with tempfile.TemporaryDirectory(dir=self.dir.parent) as tmp:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
            ck = Path(tmp) / "checkpoint"
            meta = read_meta(ck)
            if meta is None:
                raise DamoHybridError(f"{path} holds no store checkpoint")
            for name, entry in meta["tables"].items():
                dim = entry["config"]["dim"]
                if name.startswith("group_") and self.dims.get(int(name[6:]), dim) != dim:
                    raise DamoHybridError(f"checkpoint {path} has {name} of dim {dim}, this Damo's is "
                                          f"{self.dims[int(name[6:])]}; nothing changed")
            replace_store(self, ck)

    def close(self) -> None:
        """Flush and release the store; closing twice is a no-op."""
        self.store.close()

    def __enter__(self) -> Damo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replace_store(owner: Any, checkpoint: Path) -> None:
    """Swap ``owner.store`` (at ``owner.dir``, opened with ``owner._cfg``) for a copy of a
    checkpoint directory; if the copy cannot be opened, the old store comes back unchanged."""
    owner.store.close()
    aside = owner.dir.with_name(f".{owner.dir.name}.replaced-{uuid.uuid4().hex}")
    os.rename(owner.dir, aside)
    try:
        owner.store = EmbeddingStore.from_checkpoint(checkpoint, owner.dir, config=owner._cfg)
    except BaseException:
        shutil.rmtree(owner.dir, ignore_errors=True)
        os.rename(aside, owner.dir)
        owner.store = EmbeddingStore(owner.dir, config=owner._cfg)
        raise
    fsync_dir(owner.dir.parent)
    shutil.rmtree(aside, ignore_errors=True)
