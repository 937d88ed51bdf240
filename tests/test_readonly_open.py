"""Opening for reading writes nothing (issue 28, class 5).

rocksdict rewrote ``db/rocksdict-config.json`` on every open, read-only ones included, so
``inspect``, ``export`` and ``dump`` modified the store they read and failed on read-only media.
Checked byte for byte on a normal disk (file list, sizes, mtimes, hashes) and on a real read-only
mount (a tmpfs remounted ``ro``; skipped where mounting is not permitted).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from _tmpfs import remount_read_only, snapshot, tmpfs

from damo_hybrid import EmbeddingStore, TableConfig
from damo_hybrid.cli import main

TABLES = [TableConfig("a", 4), TableConfig("b", 8)]
KEYS = np.arange(1, 301, dtype=np.uint64)
TRAIN = ["train", "--quiet", "--steps", "2", "--batch-size", "64", "--dim", "4", "--vocab-min", "100",
         "--vocab-max", "1000", "--checkpoint-every", "2", "--cache-mb", "1"]


def _store(path) -> None:
    with EmbeddingStore(path, TABLES) as s:
        s.apply_gradients("a", KEYS, np.ones((len(KEYS), 4), np.float32))
        s.apply_gradients("b", KEYS, np.ones((len(KEYS), 8), np.float32))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store trained by the CLI with a training checkpoint (for ``export --onnx``)."""
    d = tmp_path_factory.mktemp("trained")
    assert main([*TRAIN, "--store", str(d / "st")]) == 0
    return d


def test_a_read_only_open_leaves_the_store_byte_for_byte_unchanged(tmp_path):
    _store(tmp_path / "s")
    before = snapshot(tmp_path / "s")
    with EmbeddingStore(tmp_path / "s", read_only=True) as r:
        assert r.lookup("a", KEYS).shape == (len(KEYS), 4)
        assert sum(len(k) for k, _ in r.scan("b")) == len(KEYS)
        r.stats()
        r.flush()
    assert snapshot(tmp_path / "s") == before


@pytest.mark.parametrize("cmd", [
    ["inspect"], ["inspect", "--json"], ["export", "--out", "{out}/w.npz"], ["dump", "--out", "{out}/d.npz"],
    ["dump", "--out", "{out}/d.bin", "--format", "seed"], ["dump", "--out", "{out}/e.npz", "--min-count", "1"],
])
def test_read_only_commands_leave_the_store_byte_for_byte_unchanged(tmp_path, capsys, cmd):
    _store(tmp_path / "s")
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path / "s")
    args = [cmd[0], "--store", str(tmp_path / "s")] + [a.format(out=tmp_path / "out") for a in cmd[1:]]
    assert main(args) == 0, capsys.readouterr().err
    assert snapshot(tmp_path / "s") == before


def test_export_onnx_leaves_the_store_and_its_checkpoints_unchanged(trained, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(trained, root, symlinks=True)
    before = snapshot(root)
    assert main(["export", "--store", str(root / "st"), "--onnx", str(tmp_path / "onnx")]) == 0, capsys.readouterr().err
    assert snapshot(root) == before


def test_export_onnx_does_not_move_a_damaged_checkpoint_aside(trained, tmp_path, capsys):
    """A damaged newest checkpoint is passed over, not renamed: export only reads (train --resume
    sets it aside)."""
    root = tmp_path / "copy"
    shutil.copytree(trained, root, symlinks=True)
    newest = max((root / "st.ckpt").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    (newest / "trainer.pt").write_bytes(b"not a checkpoint")
    before = snapshot(root)
    main(["export", "--store", str(root / "st"), "--onnx", str(tmp_path / "onnx")])
    capsys.readouterr()
    assert snapshot(root) == before


def test_every_reader_works_on_a_read_only_mount(trained, tmp_path, capsys):
    with tmpfs(tmp_path / "mnt") as mnt:
        _store(mnt / "s")
        shutil.copytree(trained / "st", mnt / "st")
        shutil.copytree(trained / "st.ckpt", mnt / "st.ckpt")
        remount_read_only(mnt)
        out = tmp_path / "out"
        out.mkdir()
        for cmd in (["inspect", "--store", str(mnt / "s")],
                    ["inspect", "--store", str(mnt / "st"), "--json"],
                    ["export", "--store", str(mnt / "s"), "--out", str(out / "w.npz")],
                    ["dump", "--store", str(mnt / "s"), "--out", str(out / "d.npz"), "--min-count", "1"],
                    ["dump", "--store", str(mnt / "s"), "--out", str(out / "d.bin"), "--format", "seed"],
                    ["export", "--store", str(mnt / "st"), "--onnx", str(out / "onnx")]):
            rc = main(cmd)
            err = capsys.readouterr().err
            assert rc == 0, f"{cmd[0]}: {err}"
        with np.load(out / "w.npz") as z:
            assert len(z["keys_a"]) == len(KEYS)
        with EmbeddingStore(mnt / "s", read_only=True) as r:  # the Python API too
            np.testing.assert_array_equal(r.lookup("a", KEYS), r.lookup("a", KEYS))
            assert r.stats().table_rows == {"a": len(KEYS), "b": len(KEYS)}
        # a checkpoint on read-only media is a source: restored elsewhere, itself untouched
        from damo_hybrid.dist.checkpoint import restore_shard
        from damo_hybrid.pipeline.checkpoint import complete_checkpoints

        ck = complete_checkpoints(mnt / "st.ckpt")[0]
        with EmbeddingStore.from_checkpoint(ck / "store", tmp_path / "restored") as s:
            assert s.stats().rows > 0
        with restore_shard(ck, tmp_path / "resharded", 0, 2) as s:
            assert s.stats().rows >= 0


def test_a_predictor_reads_an_export_on_a_read_only_mount(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.serving import Predictor

    with tmpfs(tmp_path / "mnt") as mnt:
        assert main(["export", "--store", str(trained / "st"), "--onnx", str(mnt / "onnx")]) == 0
        remount_read_only(mnt)
        b = SyntheticCriteo(16, seed=0).batch(0)
        assert Predictor(mnt / "onnx").predict(b.sparse, b.dense).shape == (16,)
