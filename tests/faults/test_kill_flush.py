"""kill -9 inside a flush of a device tier (the CPU twin) and inside a checkpoint of a store
that two collections train. The store must reopen with exact counts and no row of the last
checkpoint missing; the last complete checkpoint must equal an uninterrupted run's at the same
step; an interrupted checkpoint must leave no checkpoint, never a partial one."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from damo_hybrid import EmbeddingStore
from damo_hybrid.storage.checkpoint import MARKER

CHILD = Path(__file__).with_name("_kill_child.py")

HOOKS = [
    # store.flush(): the device tier sends its rows down in chunks, the host tier hands them to the writer
    ("flush", "damo_hybrid.cache.host:HostCache.put_rows", 1),
    ("flush", "damo_hybrid.cache.host:HostCache.put_rows", 2),
    ("flush", "damo_hybrid.cache.writer:WriteBehind.submit", 2),
    ("flush", "damo_hybrid.storage.rowio:RowIO.write", 1),  # in the writer thread
    # store.checkpoint(): flush of both collections' tiers, then the checkpoint itself
    ("checkpoint", "damo_hybrid.cache.host:HostCache.put_rows", 2),
    ("checkpoint", "damo_hybrid.storage.rowio:RowIO.write", 2),
    ("checkpoint", "damo_hybrid.storage.rocksdb:RocksDBStorage.checkpoint", 1),
    ("checkpoint", "damo_hybrid.storage.meta:atomic_file", 1),
    ("checkpoint", "damo_hybrid.storage.checkpoint:fsync_tree", 1),
    ("checkpoint", "damo_hybrid.storage.checkpoint:fsync_dir", 1),  # the rename done, not yet persisted
]


def _run(root: Path, *args: str) -> int:
    r = subprocess.run([sys.executable, str(CHILD), str(root / "store"), str(root / "ckpt"), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, -signal.SIGKILL), r.stderr
    return r.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    assert _run(root, "ref") == 0
    return root


def _checkpoints(root: Path) -> list[Path]:
    """Visible checkpoint directories (hidden partial ones are never used)."""
    return sorted((p for p in (root / "ckpt").iterdir() if not p.name.startswith(".")),
                  key=lambda p: int(p.name.split("-")[1]))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("mode, hook, nth", HOOKS, ids=[f"{m}-{h.split(':')[1]}-{n}" for m, h, n in HOOKS])
def test_kill_9_inside_a_flush_or_checkpoint_loses_nothing_checkpointed(tmp_path, reference, snapshot, mode, hook, nth):
    assert _run(tmp_path, mode, hook, str(nth)) == -signal.SIGKILL, "the hook never fired"
    ckpts = _checkpoints(tmp_path)
    assert ckpts[0].name == "step-6"
    for ck in ckpts:  # every visible checkpoint is complete and equals the uninterrupted run's
        assert (ck / MARKER).is_file(), f"{ck} is visible without its marker"
        snapshot.same(snapshot(ck), snapshot(reference / "ckpt" / ck.name))
    last = snapshot(ckpts[-1])
    with EmbeddingStore(tmp_path / "store") as st:  # reopens for writing: recounts after the crash
        for t in ("a", "b"):
            keys = np.concatenate([k for k, _ in st.scan(t)] or [np.zeros(0, np.uint64)])
            assert st.count_rows(t) == len(keys) == st.stats().table_rows[t]
            assert np.isin(last[t][0], keys).all(), f"table {t}: rows of the last checkpoint are missing"
    restored = tmp_path / "restored"
    EmbeddingStore.from_checkpoint(ckpts[-1], restored).close()
    snapshot.same(snapshot(restored), last)
