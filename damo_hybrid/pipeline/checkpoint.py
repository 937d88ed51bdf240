"""Atomic save and restore of the whole training state.

A training checkpoint is a directory::

    store/           an EmbeddingStore checkpoint (rows, step counters, admission counts, configs)
    trainer.pt       dense model and dense optimizer state, step, samples, RNG states
    TRAINING.json    marker, written last

built in a hidden sibling directory and renamed into place, so a crash (even ``kill -9``)
leaves either the previous checkpoints or a new complete one; a directory without the
marker is never picked up. Checkpoints are named ``step-<N>`` under a root directory, and
the newest complete one is found by :func:`latest_checkpoint`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from ..storage.files import atomic_file, fsync_dir

__all__ = ["save_training_checkpoint", "latest_checkpoint", "load_trainer_state", "prune_checkpoints"]

_MARKER = "TRAINING.json"
_NAME = re.compile(r"^step-(\d+)$")


def save_training_checkpoint(root: str | os.PathLike[str], step: int, store: Any, trainer_state: dict[str, Any]) -> Path:
    """Write ``root/step-<step>`` atomically.

    Args:
        root: checkpoint root (created if missing).
        step: the number of completed training steps.
        store: the :class:`~damo_hybrid.store.EmbeddingStore` (its caches already flushed).
        trainer_state: picklable dict (tensors allowed) saved with ``torch.save``.
    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f"step-{step}"
    if dst.exists():
        raise FileExistsError(f"checkpoint {dst} already exists")
    tmp = root / f".step-{step}.partial-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        store.checkpoint(tmp / "store")
        with atomic_file(tmp / "trainer.pt") as f:
            torch.save(trainer_state, f)
        with atomic_file(tmp / _MARKER) as f:
            f.write(json.dumps({"step": step, "created": time.time()}).encode())
        os.rename(tmp, dst)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / _MARKER).is_file() and (p / "trainer.pt").is_file():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, p)
    return best[1] if best else None


def load_trainer_state(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``trainer_state`` saved in a checkpoint."""
    return torch.load(Path(ckpt) / "trainer.pt", weights_only=False)


def prune_checkpoints(root: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and leftover partial ones."""
    root = Path(root)
    done = sorted((int(_NAME.match(p.name).group(1)), p) for p in root.iterdir()  # type: ignore[union-attr]
                  if _NAME.match(p.name) and (p / _MARKER).is_file())
    for _, p in done[:-keep] if keep > 0 else done:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(".step-") and ".partial-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
