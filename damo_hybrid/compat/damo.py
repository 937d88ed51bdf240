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
  checkpoint: weights, optimizer state and step counters, and last a ``MANIFEST.json`` of their
  sizes and SHA-256); ``load`` reads those, not the seed's raw RocksDB records, checks the
  manifest, and swaps the restored store in whole (an interrupted ``load`` leaves the old store or
  the new one, which the next open finds);
- the config may be given as a dict as well as a file path, and :meth:`Damo.close` (or ``with``)
  releases the store.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import clip
from ..config import (
    InitializerConfig,
    OptimizerConfig,
    OptimizerKind,
    StoreConfig,
    TableConfig,
    reject_unknown,
)
from ..errors import DamoHybridError, UnknownTableError
from ..storage.checkpoint import copy_checkpoint
from ..storage.files import MANIFEST, DamagedOutputError, atomic_dir, atomic_file, recover_dir, scratch_dir, \
    verify_manifest, write_manifest
from ..storage.meta import read_meta
from ..store import EmbeddingStore
from .seed_format import dump_seed_format

__all__ = ["Damo", "damo_initializer", "damo_optimizer"]

_V12_INIT = ("zeros", "uniform", "random", "xavier")


def damo_initializer(params: dict[str, Any], dim: int) -> InitializerConfig:
    """A seed 1.2 initializer dict (or a 1.0 one) -> :class:`InitializerConfig`."""
    from . import _take, initializer_config  # the 1.0 names; the parameters' type checks

    name = params.get("name", "zeros")
    if name not in _V12_INIT:
        return initializer_config(params)
    if name == "zeros":
        reject_unknown("zeros initializer parameters", set(params) - {"name"}, ())
        return InitializerConfig.zeros()
    if name == "random":
        v = _take(params, {"mean": 0.0, "stddev": 1.0}, "random initializer")
        if not v["stddev"] > 0:
            raise ValueError(f"random initializer: stddev must be > 0, got {v['stddev']}")
        return InitializerConfig.normal(mean=v["mean"], std=v["stddev"])
    reject_unknown(f"{name} initializer parameters", set(params) - {"name"}, ())
    b = math.sqrt((1.0 if name == "uniform" else 6.0) / dim)
    return InitializerConfig.uniform(-b, b)


def damo_optimizer(params: dict[str, Any]) -> OptimizerConfig:
    """A seed 1.2 optimizer dict (``adamw``, or a 1.0 name) -> :class:`OptimizerConfig`."""
    from . import _take, optimizer_config  # the 1.0 names; the parameters' type checks

    name = params.get("name", "adamw")
    if name != "adamw":
        return optimizer_config(params)
    v = _take(params, {"gamma": 0.001, "beta1": 0.9, "beta2": 0.999, "lambda": 0.01, "epsilon": 1e-8}, "adamw optimizer")
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
        if not isinstance(cfg, dict):
            raise ValueError(f"a Damo config must be a JSON object, got {clip(cfg)}")
        reject_unknown("Damo config fields", set(cfg), ("dir", "ttl", "embeddings"))
        if "dir" not in cfg or "embeddings" not in cfg:
            raise ValueError("a Damo config needs 'dir' and 'embeddings'")
        if not isinstance(cfg["dir"], (str, os.PathLike)):
            raise ValueError(f"dir must be a path (text), got {clip(cfg['dir'])}")
        if not isinstance(cfg["embeddings"], list):
            raise ValueError(f"embeddings must be a list of objects, got {clip(cfg['embeddings'])}")
        ttl = cfg.get("ttl", 0)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
            raise ValueError(f"ttl must be an int >= 0 (seconds; 0: no expiry), got {clip(ttl)}")
        self.dims: dict[int, int] = {}
        tables = []
        for i, e in enumerate(cfg["embeddings"]):
            if not isinstance(e, dict):
                raise ValueError(f"embeddings[{i}] must be an object, got {clip(e)}")
            reject_unknown(f"embeddings[{i}] fields", set(e), ("dim", "group", "initializer", "optimizer"))
            dim, group = e.get("dim"), e.get("group")
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise ValueError(f"embeddings[{i}].dim must be an int >= 1, got {clip(dim)}")
            if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < 256:
                raise ValueError(f"embeddings[{i}].group must be an int in [0, 256), got {clip(group)}")
            if group in self.dims:
                raise ValueError(f"group {group} appears twice in embeddings")
            for part in ("initializer", "optimizer"):
                if not isinstance(e.get(part) or {}, dict):
                    raise ValueError(f"embeddings[{i}].{part} must be an object, got {clip(e[part])}")
            self.dims[group] = dim
            tables.append(TableConfig(_table(group), dim, initializer=damo_initializer(dict(e.get("initializer") or {}), dim),
                                      optimizer=damo_optimizer(dict(e.get("optimizer") or {}))))
        self.dir = Path(cfg["dir"])
        self.ttl = ttl
        self._cfg = StoreConfig(ttl_seconds=ttl or None)
        self._tables = tables
        self._temporary = False
        recover_dir(self.dir)  # a load() killed inside its swap left the old store aside
        self.store = EmbeddingStore(self.dir, tables, self._cfg)

    # ------------------------------------------------------------------ rows
    def _group(self, group: int) -> int:
        if isinstance(group, (bool, np.bool_)) or not isinstance(group, (int, np.integer)) or int(group) not in self.dims:
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
        a crash leaves the previous file (or none), never a partial one. Its last member,
        ``MANIFEST.json``, holds the size and SHA-256 of every other, which :meth:`load` checks."""
        path = Path(path)
        with scratch_dir(path) as tmp:
            ck = self.store.checkpoint(tmp / "checkpoint")
            write_manifest(tmp, "Damo checkpoint")
            with atomic_file(path) as f, tarfile.open(fileobj=f, mode="w") as tar:
                tar.add(ck, arcname="checkpoint")
                tar.add(tmp / MANIFEST, arcname=MANIFEST)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace every row with those of a file :meth:`checkpoint` wrote.

        Raises:
            FileNotFoundError: no such file.
            DamoHybridError: not a checkpoint of this kind (a seed checkpoint file, say), or
                (:class:`~damo_hybrid.storage.files.DamagedOutputError`) one whose members are not
                those its manifest lists; nothing changed.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file {path}")
        if not tarfile.is_tarfile(path):
            raise DamoHybridError(f"{path} is not a damo_hybrid checkpoint file (the seed's own checkpoint "
                                  "files hold its raw RocksDB records and are not read here)")
        with scratch_dir(self.dir) as tmp:
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, EOFError, OSError) as e:
                raise DamagedOutputError(f"{path} is damaged ({str(e)[:80]}): write it again with checkpoint()") from None
            verify_manifest(tmp, "Damo checkpoint", fix="write it again with checkpoint()", shown=str(path))
            ck = tmp / "checkpoint"
            meta = read_meta(ck)
            if meta is None:
                raise DamoHybridError(f"{path} holds no store checkpoint")
            for name, entry in meta["tables"].items():
                dim = entry["config"].get("dim")
                if not isinstance(dim, int) or isinstance(dim, bool):
                    raise DamagedOutputError(f"{path} (member checkpoint/meta.json) gives table {name[:40]!r} the dim "
                                             f"{clip(dim)}, not an int: the checkpoint is damaged; write it again "
                                             "with checkpoint()")
                if name.startswith("group_") and name[6:].isdigit() and self.dims.get(int(name[6:]), dim) != dim:
                    raise DamoHybridError(f"checkpoint {path} has {name} of dim {dim}, this Damo's is "
                                          f"{self.dims[int(name[6:])]}; nothing changed")
            replace_store(self, ck)

    def close(self) -> None:
        """Flush and release the store; closing twice is a no-op. A temporary store
        (:func:`~damo_hybrid.compat.torch.load_model`'s default workdir) is deleted."""
        self.store.close()
        if self._temporary:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _delete_when_closed(self) -> None:
        """Make this Damo's directory temporary: deleted by :meth:`close`, at the latest when the
        process exits."""
        self._temporary = True
        atexit.register(self.close)

    def __enter__(self) -> Damo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replace_store(owner: Any, checkpoint: Path) -> None:
    """Swap ``owner.store`` (at ``owner.dir``, opened with ``owner._cfg``) for a copy of a
    checkpoint directory. The copy is built and opened once beside ``owner.dir``, then swapped in
    whole (:func:`~damo_hybrid.storage.files.atomic_dir`): killed at any point, ``owner.dir``
    holds the old store or the new one (the next open puts an old one set aside back). If the
    copy cannot be made or opened, the old store comes back unchanged."""
    owner.store.close()
    try:
        with atomic_dir(owner.dir, what="store", manifest=False) as build:  # a store changes after: no manifest
            copy_checkpoint(checkpoint, build)
            EmbeddingStore(build, config=owner._cfg).close()  # a store this owner can open
    finally:
        owner.store = EmbeddingStore(owner.dir, config=owner._cfg)
