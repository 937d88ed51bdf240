"""Outputs are built beside their destination and swapped in; readers check that the parts belong together.

In-process cases (an exception at a named point of a write, a file swapped in from another
output, a folder set aside by an interrupted swap). The same writes killed with SIGKILL, SIGINT
and SIGTERM in a child process are in ``tests/faults/test_write_interrupts.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from faults._write_model import IDS, Tiny, logits

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig
from damo_hybrid.compat.torch import REGISTRY, damo_embedding_init, load_model, save_model
from damo_hybrid.errors import DamoHybridError

OPT, INIT = OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.1)


# ------------------------------------------------------------------ the shared helper
def test_atomic_dir_swaps_a_complete_folder_in_and_verifies_it(tmp_path):
    from damo_hybrid.storage.files import MANIFEST, atomic_dir, verify_manifest

    dst = tmp_path / "out"
    with atomic_dir(dst, markers=("a.txt",), what="test output") as b:
        assert b.parent == tmp_path and b.name.startswith(".out.")
        (b / "a.txt").write_text("old")
    with atomic_dir(dst, markers=("a.txt",), what="test output") as b:
        (b / "a.txt").write_text("new")
        (b / "sub").mkdir()
        (b / "sub" / "b.bin").write_bytes(b"x" * 10)
        assert (dst / "a.txt").read_text() == "old"  # the old output stays until the new one is whole
    assert (dst / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it
    m = verify_manifest(dst, "test output", required=("a.txt", "sub/b.bin"))
    assert set(m["files"]) == {"a.txt", "sub/b.bin"} and len(m["id"]) == 32
    assert json.loads((dst / MANIFEST).read_text())["id"] == m["id"]


def test_atomic_dir_leaves_the_old_folder_on_an_error_and_refuses_a_foreign_one(tmp_path):
    from damo_hybrid.storage.files import atomic_dir

    dst = tmp_path / "out"
    with atomic_dir(dst, markers=("a.txt",), what="test output") as b:
        (b / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(dst, markers=("a.txt",), what="test output") as b:
        (b / "a.txt").write_text("new")
        raise KeyboardInterrupt
    assert (dst / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine .*not a test output") as e:
        with atomic_dir(mine, markers=("a.txt",), what="test output") as b:
            (b / "a.txt").write_text("x")
    assert len(str(e.value).splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "a.txt").exists()


@pytest.mark.parametrize("point", ["aside", "in"])
def test_atomic_dir_interrupted_inside_the_swap_keeps_old_or_new(tmp_path, monkeypatch, point):
    from damo_hybrid.storage import files

    dst = tmp_path / "out"
    with files.atomic_dir(dst) as b:
        (b / "a.txt").write_text("old")
    real = os.rename

    def rename(src, target):
        real(src, target)  # the rename happens, then Ctrl-C lands before the next instruction
        if (point == "aside" and Path(src) == dst) or (point == "in" and Path(target) == dst):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt), files.atomic_dir(dst) as b:
        (b / "a.txt").write_text("new")
    monkeypatch.setattr(os, "rename", real)
    assert (files.recover_dir(dst) / "a.txt").read_text() == ("old" if point == "aside" else "new")
    files.verify_manifest(dst, "test output")


def test_a_reader_recovers_a_folder_set_aside_by_a_killed_swap(tmp_path):
    from damo_hybrid.storage.files import aside_path, atomic_dir, recover_dir

    dst = tmp_path / "out"
    with atomic_dir(dst) as b:
        (b / "a.txt").write_text("old")
    os.rename(dst, aside_path(dst))  # killed between "old aside" and "new in"
    assert recover_dir(dst) == dst and (dst / "a.txt").read_text() == "old"
    assert not aside_path(dst).exists()
    shutil.copytree(dst, aside_path(dst))  # killed after "new in", before the old copy was deleted
    assert recover_dir(dst) == dst and not aside_path(dst).exists()


@pytest.mark.parametrize("damage", ["missing", "changed", "truncated", "no manifest entry"])
def test_verify_manifest_refuses_parts_that_do_not_belong_together(tmp_path, damage):
    from damo_hybrid.storage.files import MANIFEST, DamagedOutputError, atomic_dir, verify_manifest

    dst = tmp_path / "out"
    with atomic_dir(dst) as b:
        (b / "a.npy").write_bytes(b"a" * 100)
        (b / "b.json").write_text("{}")
    if damage == "missing":
        (dst / "a.npy").unlink()
    elif damage == "changed":
        (dst / "a.npy").write_bytes(b"b" * 100)
    elif damage == "truncated":
        (dst / "a.npy").write_bytes(b"a" * 50)
    else:
        m = json.loads((dst / MANIFEST).read_text())
        del m["files"]["a.npy"]
        (dst / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DamagedOutputError, match="a.npy") as e:
        verify_manifest(dst, "test output", required=("a.npy", "b.json"))
    assert len(str(e.value).splitlines()) == 1 and len(str(e.value)) < 300
    assert isinstance(e.value, DamoHybridError)


def test_a_manifest_naming_a_path_outside_its_folder_is_refused(tmp_path):
    from damo_hybrid.storage.files import MANIFEST, DamagedOutputError, atomic_dir, verify_manifest

    dst = tmp_path / "out"
    with atomic_dir(dst) as b:
        (b / "a").write_text("x")
    m = json.loads((dst / MANIFEST).read_text())
    m["files"]["../secret"] = m["files"].pop("a")
    (dst / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DamagedOutputError, match="outside"):
        verify_manifest(dst, "test output")


def test_atomic_file_removes_temp_files_left_by_a_killed_writer(tmp_path):
    from damo_hybrid.storage.files import atomic_file

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".x.npz.{pid}.0123456789abcdef.tmp"
    stale.write_bytes(b"half")
    live = tmp_path / f".x.npz.{os.getpid()}.0123456789abcdef.tmp"  # another write of this process, under way
    live.write_bytes(b"half")
    with atomic_file(tmp_path / "x.npz") as f:
        f.write(b"whole")
    assert not stale.exists() and live.exists()


# ------------------------------------------------------------------ ONNX export and Predictor
onnx_needed = pytest.mark.skipif(not __import__("importlib").util.find_spec("onnxruntime"), reason="needs onnxruntime")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two exports of one DeepFM, before and after two more steps, and their logits on a batch."""
    pytest.importorskip("onnxruntime")
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.nn.models import MODELS, model_tables
    from damo_hybrid.pipeline.trainer import Trainer
    from damo_hybrid.serving import Predictor, export_onnx

    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    data = SyntheticCriteo(32, seed=1, vocab_min=50, vocab_max=400)
    store = EmbeddingStore(root / "s", model_tables("deepfm", 4, OPT, INIT))
    m = MODELS["deepfm"](store, data.sparse_fields, len(data.dense_fields), hidden=(8,), cache_mb=1,
                         min_cache_rows=512, backend="cpu")
    trainer = Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-2), data.batch)
    trainer.fit(2)
    export_onnx(m, root / "a")
    trainer.fit(4)  # more steps, more keys: another graph and other key files
    export_onnx(m, root / "b")
    b = data.batch(3)
    want = {k: Predictor(root / k).predict(b.sparse, b.dense) for k in "ab"}
    assert np.abs(want["a"] - want["b"]).max() > 1e-3
    yield root, m, b, want
    store.close()


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


@onnx_needed
def test_predictor_refuses_a_key_file_of_another_export(exports, tmp_path):
    from damo_hybrid.serving import Predictor

    root, _, _, _ = exports
    mixed = _copy(root / "a", tmp_path / "mixed")
    shutil.copy(root / "b" / "keys_emb.npy", mixed / "keys_emb.npy")  # an in-place re-export cut short
    with pytest.raises(DamoHybridError, match="keys_emb.npy") as e:
        Predictor(mixed)
    assert len(str(e.value).splitlines()) == 1 and len(str(e.value)) < 300


@onnx_needed
def test_reexport_interrupted_before_its_graph_leaves_the_old_export_whole(exports, tmp_path, monkeypatch):
    from damo_hybrid.serving import Predictor, export_onnx, onnx as onnx_mod

    root, m, b, want = exports
    out = _copy(root / "a", tmp_path / "out")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_mod, "onnx_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(m, out)
    np.testing.assert_array_equal(Predictor(out).predict(b.sparse, b.dense), want["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@onnx_needed
@pytest.mark.parametrize("point", ["aside", "in"])
def test_reexport_interrupted_inside_the_swap_serves_the_old_or_the_new_export(exports, tmp_path, monkeypatch, point):
    from damo_hybrid.serving import Predictor, export_onnx

    root, m, b, want = exports
    out = _copy(root / "a", tmp_path / "out")
    real = os.rename

    def rename(src, target):
        real(src, target)
        if (point == "aside" and Path(src) == out) or (point == "in" and Path(target) == out):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(m, out)
    monkeypatch.setattr(os, "rename", real)
    got = Predictor(out).predict(b.sparse, b.dense)
    np.testing.assert_allclose(got, want["a"] if point == "aside" else want["b"], atol=1e-6, rtol=0)


@onnx_needed
def test_predictor_recovers_an_export_set_aside_by_a_killed_swap(exports, tmp_path):
    from damo_hybrid.serving import Predictor

    root, _, b, want = exports
    out = tmp_path / "out"
    _copy(root / "a", tmp_path / ".out.old")  # the swap's aside copy, the destination already gone
    np.testing.assert_array_equal(Predictor(out).predict(b.sparse, b.dense), want["a"])
    assert (out / "export.json").is_file()


@onnx_needed
def test_export_refuses_a_folder_that_is_not_an_export_and_touches_nothing(exports, tmp_path):
    from damo_hybrid.serving import export_onnx

    _, m, _, _ = exports
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an ONNX export"):
        export_onnx(m, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@onnx_needed
def test_an_export_without_a_manifest_is_served_with_a_warning(exports, tmp_path, caplog):
    from damo_hybrid.serving import Predictor

    root, _, b, want = exports
    legacy = _copy(root / "a", tmp_path / "legacy")
    (legacy / "MANIFEST.json").unlink(missing_ok=True)  # written by an earlier version
    with caplog.at_level(logging.WARNING):
        got = Predictor(legacy).predict(b.sparse, b.dense)
    np.testing.assert_array_equal(got, want["a"])
    assert any("MANIFEST.json" in r.getMessage() and "re-export" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ compat.torch save_model / load_model



def _step(model: Tiny, n: int = 1) -> None:
    opt = torch.optim.SGD(model.out.parameters(), lr=0.1)
    model.train()
    for _ in range(n):
        loss = model(IDS).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()




@pytest.fixture
def saves(tmp_path):
    """A model saved twice (``old`` then, after a step, into ``new``), and both saves' logits."""
    REGISTRY.reset()
    torch.manual_seed(0)
    model = Tiny()
    damo_embedding_init(model, tmp_path / "work", 0)
    _step(model)
    save_model(model, tmp_path / "out")
    old = logits(model)
    _step(model, 2)
    save_model(model, tmp_path / "ref")
    yield model, old, logits(model)
    REGISTRY.reset()


@pytest.mark.parametrize("point", ["new in", "old aside"])
def test_save_model_interrupted_inside_its_swap_keeps_a_whole_save(saves, tmp_path, monkeypatch, point):
    model, old, new = saves
    out = tmp_path / "out"
    real = os.rename

    def rename(src, dst):
        real(src, dst)
        if (point == "new in" and Path(dst) == out / "save_model") or (point == "old aside" and Path(src) == out / "save_model"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, out)
    monkeypatch.setattr(os, "rename", real)
    got = logits(load_model(out, workdir=tmp_path / "w2"))
    torch.testing.assert_close(got, new if point == "new in" else old, rtol=0, atol=0)


def test_load_model_refuses_a_save_without_its_rows_file(saves, tmp_path):
    (tmp_path / "out" / "save_model" / "checkpoint").unlink()
    with pytest.raises(DamoHybridError, match="checkpoint") as e:
        load_model(tmp_path / "out", workdir=tmp_path / "w2")
    assert len(str(e.value).splitlines()) == 1 and len(str(e.value)) < 300
    assert not (tmp_path / "w2").exists()  # refused before anything was opened


@pytest.mark.parametrize("part", ["state.pth", "checkpoint", "model.pt"])
def test_load_model_refuses_a_part_of_another_save(saves, tmp_path, part):
    shutil.copy(tmp_path / "ref" / "save_model" / part, tmp_path / "out" / "save_model" / part)
    with pytest.raises(DamoHybridError, match=part):
        load_model(tmp_path / "out", workdir=tmp_path / "w2")


def test_a_legacy_save_without_its_rows_file_is_refused_too(saves, tmp_path, caplog):
    save = tmp_path / "out" / "save_model"
    (save / "MANIFEST.json").unlink(missing_ok=True)  # an earlier version's save
    with caplog.at_level(logging.WARNING):
        got = logits(load_model(tmp_path / "out", workdir=tmp_path / "w2"))
    torch.testing.assert_close(got, saves[1], rtol=0, atol=0)
    assert any("MANIFEST.json" in r.getMessage() for r in caplog.records)
    (save / "checkpoint").unlink()
    with pytest.raises(DamoHybridError, match="checkpoint"):
        load_model(tmp_path / "out", workdir=tmp_path / "w3")


def test_load_model_recovers_a_save_set_aside_by_a_killed_swap(saves, tmp_path):
    os.rename(tmp_path / "out" / "save_model", tmp_path / "out" / ".save_model.old")
    torch.testing.assert_close(logits(load_model(tmp_path / "out", workdir=tmp_path / "w2")), saves[1], rtol=0, atol=0)


def test_load_model_leaves_no_workdir_behind(saves, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        torch.testing.assert_close(logits(load_model(out)), saves[1], rtol=0, atol=0)
    REGISTRY.reset()
    assert sorted(p.name for p in out.iterdir()) == ["save_model"]
    # a process that ends without a reset leaves nothing either
    code = (f"from damo_hybrid.compat.torch import load_model\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"import test_crash_safe_writes\nm = load_model({str(out)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert sorted(p.name for p in out.iterdir()) == ["save_model"]


def test_inference_export_is_swapped_in_whole(saves, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from damo_hybrid.serving import onnx as onnx_mod
    from damo_hybrid.storage.files import verify_manifest

    model = saves[0]
    save_model(model, tmp_path / "inf", False, dummy_input=IDS)
    mapper = (tmp_path / "inf" / "inference" / "mapper.json").read_text()
    monkeypatch.setattr(onnx_mod, "onnx_export", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "inf", False, dummy_input=IDS)
    assert (tmp_path / "inf" / "inference" / "mapper.json").read_text() == mapper
    verify_manifest(tmp_path / "inf" / "inference", "inference export", required=("model.onnx", "mapper.json"))
    assert sorted(p.name for p in (tmp_path / "inf").iterdir()) == ["inference"]


# ------------------------------------------------------------------ compat Damo / PyStorage
def _damo(path: Path):
    from damo_hybrid.compat import Damo

    return Damo({"dir": str(path), "ttl": 0, "embeddings": [{"dim": 4, "group": 0, "optimizer": {"name": "sgd", "gamma": 1.0}}]})


KEYS = np.arange(1, 9, dtype=np.int64)


def _rows(d) -> np.ndarray:
    w = np.zeros((len(KEYS), 4), np.float32)
    d.pull(0, KEYS, w)
    return w


def test_damo_load_refuses_a_checkpoint_file_whose_parts_were_changed(tmp_path):
    d = _damo(tmp_path / "s")
    d.push(0, KEYS, np.ones((8, 4), np.float32))
    d.checkpoint(tmp_path / "ck.bin")
    x = tmp_path / "x"
    with tarfile.open(tmp_path / "ck.bin") as tar:
        tar.extractall(x, filter="data")
    meta = x / "checkpoint" / "meta.json"
    m = json.loads(meta.read_text())
    m["tables"]["group_0"]["step"] = 99  # another step counter than the rows were saved with
    meta.write_text(json.dumps(m))
    with tarfile.open(tmp_path / "ck.bin", "w") as tar:
        for name in sorted(os.listdir(x)):
            tar.add(x / name, arcname=name)
    before = _rows(d)
    with pytest.raises(DamoHybridError, match="meta.json") as e:
        d.load(tmp_path / "ck.bin")
    assert len(str(e.value).splitlines()) == 1
    np.testing.assert_array_equal(_rows(d), before)  # nothing changed
    d.close()


def test_damo_load_of_its_own_checkpoint_restores_rows_and_leaves_nothing_beside(tmp_path):
    d = _damo(tmp_path / "s")
    d.push(0, KEYS, np.ones((8, 4), np.float32))
    want = _rows(d)
    d.checkpoint(tmp_path / "ck.bin")
    d.push(0, KEYS, np.ones((8, 4), np.float32))
    d.load(tmp_path / "ck.bin")
    np.testing.assert_array_equal(_rows(d), want)
    d.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.bin", "s"]


def test_pystorage_reopens_the_store_set_aside_by_a_killed_restore(tmp_path):
    import damo_hybrid.compat as damo
    from damo_hybrid.storage.files import aside_path

    s = damo.PyStorage(str(tmp_path / "s"))
    e = damo.PyEmbedding(s, damo.PyOptimizer({"name": "sgd", "gamma": 1.0}), damo.PyInitializer({"name": "zeros"}), 4)
    keys = np.arange(1, 9, dtype=np.uint64)
    e.apply_gradients(keys, np.ones(32, np.float32))
    s.close()
    os.rename(tmp_path / "s", aside_path(tmp_path / "s"))  # a restore killed between its two renames
    s = damo.PyStorage(str(tmp_path / "s"))
    assert s.store.count_rows("group_0") == 8  # the old store, not a new empty one
    s.close()


# ------------------------------------------------------------------ docs
def test_migration_lists_the_two_refusals_the_seed_accepts(tmp_path):
    import damo_hybrid.compat as damo
    from damo_hybrid.errors import ConfigConflictError

    text = " ".join((Path(__file__).parents[1] / "docs" / "migration.md").read_text().split())
    damo.PyStorage(str(tmp_path / "t"), 60).close()
    with pytest.raises(ConfigConflictError) as e:
        damo.PyStorage(str(tmp_path / "t"), 0)
    assert "was created with a TTL" in str(e.value) and "was created with a TTL" in text
    s = damo.PyStorage(str(tmp_path / "g"))
    damo.PyEmbedding(s, damo.PyOptimizer({"name": "adam"}), damo.PyInitializer({"name": "zeros"}), 4)
    with pytest.raises(ConfigConflictError) as e:
        damo.PyEmbedding(s, damo.PyOptimizer({"name": "sgd"}), damo.PyInitializer({"name": "zeros"}), 4)
    s.close()
    assert "the stored optimizer state cannot be reused" in str(e.value)
    assert "the stored optimizer state cannot be reused" in text and "allow_config_change" in text


def test_a_folder_behind_a_link_is_replaced_and_the_link_goes(tmp_path):
    from damo_hybrid.storage.files import atomic_dir, verify_manifest

    real = tmp_path / "real"
    with atomic_dir(real) as b:
        (b / "a.txt").write_text("old")
    (tmp_path / "link").symlink_to(real)
    with atomic_dir(tmp_path / "link") as b:
        (b / "a.txt").write_text("new")
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "a.txt").read_text() == "new"
    assert (real / "a.txt").read_text() == "old"  # what the link pointed to is not deleted
    verify_manifest(tmp_path / "link", "test output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_cli_export_onnx_refuses_a_folder_that_is_not_an_export_before_any_work(tmp_path, capsys):
    from damo_hybrid.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code = main(["export", "--store", str(tmp_path / "no-store"), "--onnx", str(mine)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "not an ONNX export" in err[0], err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
