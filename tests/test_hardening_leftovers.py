"""Issue 28, the leftovers of each class: seed-API coercion, readers on read-only media, a store
opened after a killed swap, a failed store creation, outputs written in place, benchmarks that
pass on failure, output into a closed pipe, RocksDB messages of any length.

Full disks are a small tmpfs filled to the last byte, read-only media a tmpfs remounted ``ro``
(both skipped where mounting is not permitted).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _tmpfs import fill, remount_read_only, tmpfs
from faults._write_model import IDS, Tiny, logits

import damo_hybrid.compat as damo
from damo_hybrid import EmbeddingStore, TableConfig
from damo_hybrid.cli import main
from damo_hybrid.compat.damo import damo_initializer, damo_optimizer
from damo_hybrid.compat.torch import REGISTRY, Embedding, damo_embedding_init, load_model, save_model
from damo_hybrid.errors import DamagedOutputError, DamoHybridError
from damo_hybrid.storage.files import aside_path, write_manifest

ROOT = Path(__file__).parents[1]
KEYS = np.arange(1, 101, dtype=np.uint64)
TRAIN = ["train", "--quiet", "--steps", "2", "--batch-size", "64", "--dim", "4", "--vocab-min", "100",
         "--vocab-max", "1000", "--cache-mb", "1"]


def _store(path: Path) -> None:
    with EmbeddingStore(path, [TableConfig("a", 4)]) as s:
        s.apply_gradients("a", KEYS, np.ones((len(KEYS), 4), np.float32))


# ------------------------------------------------------------------ 1. seed-API values keep their type
def _filter(tmp_path: Path, **p):
    return lambda: damo.PyFilter({"path": str(tmp_path / "cbf"), **p})


def _dump(tmp_path: Path, **cond):
    def run():
        with damo.PyStorage(str(tmp_path / "s")) as s:
            s.dump(str(tmp_path / "d.bin"), cond)
    return run


COERCED = [
    (lambda t: lambda: damo.initializer_config({"name": "random_normal", "stddev": "0.1"}), r"'stddev'.*'0\.1'"),
    (lambda t: lambda: damo.initializer_config({"name": "random_uniform", "min": True}), r"'min'.*True"),
    (lambda t: lambda: damo.initializer_config({"name": "zeros", "seed": 7.5}), r"'seed'.*7\.5"),
    (lambda t: lambda: damo.initializer_config({"name": "zeros", "seed": True}), r"'seed'.*True"),
    (lambda t: lambda: damo.initializer_config({"name": "zeros", "seed": "7"}), r"'seed'.*'7'"),
    (lambda t: lambda: damo.optimizer_config({"name": "adam", "gamma": "0.1"}), r"'gamma'.*'0\.1'"),
    (lambda t: lambda: damo.optimizer_config({"name": "sgd", "lambda": False}), r"'lambda'.*False"),
    (lambda t: lambda: damo.schedule_config({"name": "exponential_decay", "decay_steps": "100"}), r"'decay_steps'.*'100'"),
    (lambda t: _filter(t, count=7.5), r"'count'.*7\.5"),
    (lambda t: _filter(t, count=True), r"'count'.*True"),
    (lambda t: _filter(t, capacity=1e6), r"'capacity'.*1000000\.0"),
    (lambda t: _filter(t, fpr="0.01"), r"'fpr'.*'0\.01'"),
    (lambda t: _filter(t, reload="yes"), r"'reload'.*'yes'"),
    (lambda t: lambda: damo.PyFilter({"path": 5}), r"'path'.*5"),
    (lambda t: lambda: damo.PyStorage(str(t / "s"), True), r"ttl.*True"),
    (lambda t: _dump(t, min_count=2.5), r"'min_count'.*2\.5"),
    (lambda t: _dump(t, group=True), r"'group'.*True"),
    (lambda t: _dump(t, expire_days="1"), r"'expire_days'.*'1'"),
    (lambda t: lambda: damo_optimizer({"name": "adamw", "gamma": "0.1"}), r"'gamma'.*'0\.1'"),
    (lambda t: lambda: damo_optimizer({"name": "adamw", "lambda": True}), r"'lambda'.*True"),
    (lambda t: lambda: damo_initializer({"name": "random", "stddev": "1"}, 4), r"'stddev'.*'1'"),
    (lambda t: lambda: damo_initializer({"name": "random", "mean": False}, 4), r"'mean'.*False"),
    (lambda t: lambda: Embedding(True, 0), r"dim.*True"),
    (lambda t: lambda: Embedding(4, False), r"group.*False"),
]


@pytest.mark.parametrize("make, why", COERCED, ids=[f"case{i}" for i in range(len(COERCED))])
def test_seed_api_values_of_the_wrong_type_are_refused_not_converted(tmp_path, make, why):
    with pytest.raises(ValueError, match=why) as e:
        make(tmp_path)()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg


def test_seed_api_values_of_the_right_type_still_work(tmp_path):
    assert damo.initializer_config({"name": "random_normal", "stddev": 1, "seed": 3}).std == 1.0  # an int is a number
    assert damo.optimizer_config({"name": "adam", "gamma": np.float32(0.5)}).lr == 0.5
    assert damo_optimizer({"name": "adamw", "gamma": 1}).lr == 1.0
    f = damo.PyFilter({"path": str(tmp_path / "cbf"), "count": 2, "capacity": 1024, "fpr": 0.01, "reload": False})
    assert f.min_count == 2
    damo.PyStorage(str(tmp_path / "s"), np.int64(0)).close()


def test_a_huge_wrong_value_is_clipped_in_the_message():
    with pytest.raises(ValueError) as e:
        damo.initializer_config({"name": "random_normal", "stddev": "9" * 10_000})
    assert len(str(e.value)) < 200


def test_pyembedding_and_damo_refuse_bool_ints(tmp_path):
    s = damo.PyStorage(str(tmp_path / "s"))
    opt, init = damo.PyOptimizer({"name": "sgd"}), damo.PyInitializer({"name": "zeros"})
    with pytest.raises(ValueError, match="dim.*True"):
        damo.PyEmbedding(s, opt, init, True)
    with pytest.raises(ValueError, match="group.*False"):
        damo.PyEmbedding(s, opt, init, 4, False)
    s.close()
    with pytest.raises(ValueError, match="step.*True"):
        opt.call(np.zeros(4, np.float32), np.zeros(4, np.float32), True)


# ------------------------------------------------------------------ export.json / sparse_config.json of the wrong type
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    d = tmp_path_factory.mktemp("export")
    assert main([*TRAIN, "--store", str(d / "st"), "--checkpoint-every", "2"]) == 0
    assert main(["export", "--store", str(d / "st"), "--onnx", str(d / "onnx")]) == 0
    return d / "onnx"


@pytest.mark.parametrize("key, value", [("n_dense", "13"), ("n_dense", 13.0), ("n_dense", True), ("fields", "C1"),
                                        ("fields", [1, 2]), ("emb_table", 5), ("tables", "emb"),
                                        ("compression", "qr"), ("lin_table", 3)])
def test_an_export_json_value_of_the_wrong_type_is_damage_naming_the_file(export, tmp_path, key, value):
    import shutil

    from damo_hybrid.serving import Predictor

    d = tmp_path / "onnx"
    shutil.copytree(export, d)
    meta = json.loads((d / "export.json").read_text())
    meta[key] = value
    (d / "export.json").write_text(json.dumps(meta))
    write_manifest(d, "ONNX export")  # the parts belong together: only the value is wrong
    with pytest.raises(DamagedOutputError, match=r"export\.json") as e:
        Predictor(d)
    assert key in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300







@pytest.fixture
def saved(tmp_path):
    """A trained Tiny saved into ``tmp_path/out``; its logits."""
    REGISTRY.reset()
    torch.manual_seed(0)
    model = Tiny()
    damo_embedding_init(model, tmp_path / "work", 0)
    model.train()
    model(IDS).pow(2).mean().backward()
    save_model(model, tmp_path / "out")
    want = logits(model)
    REGISTRY.reset()
    yield tmp_path / "out", want
    REGISTRY.reset()


@pytest.mark.parametrize("cfg", [{"ttl": "5"}, {"ttl": 7.5}, {"ttl": True}, {"embeddings": "v"},
                                 {"embeddings": [{"dim": "4", "group": 0}]}])
def test_a_sparse_config_value_of_the_wrong_type_is_damage_naming_the_file(saved, tmp_path, cfg):
    out, _ = saved
    p = out / "save_model" / "sparse_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **cfg}))
    write_manifest(out / "save_model", "saved model")
    with pytest.raises(DamagedOutputError, match=r"sparse_config\.json") as e:
        load_model(out, workdir=tmp_path / "w")
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


# ------------------------------------------------------------------ 2. readers on read-only media
def test_load_model_puts_its_default_workdir_in_the_temporary_folder(saved, tmp_path, monkeypatch):
    out, want = saved
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    model = load_model(out)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
    assert sorted(p.name for p in out.iterdir()) == ["save_model"]  # the model folder is only read
    assert model.v.damo.dir.parent == tmp and model.v.damo.dir.name.startswith("damo_workdir-")
    REGISTRY.reset()
    assert list(tmp.iterdir()) == []  # removed when its store closes


@pytest.mark.parametrize("aside", [False, True], ids=["whole", "set-aside-by-a-killed-save"])
def test_load_model_reads_a_save_on_a_read_only_mount(saved, tmp_path, aside):
    import shutil

    out, want = saved
    with tmpfs(tmp_path / "mnt") as mnt:
        shutil.copytree(out, mnt / "out")
        if aside:
            os.rename(mnt / "out" / "save_model", aside_path(mnt / "out" / "save_model"))
        remount_read_only(mnt)
        model = load_model(mnt / "out")
        torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
        REGISTRY.reset()


def test_a_predictor_reads_an_export_set_aside_on_a_read_only_mount(export, tmp_path):
    import shutil

    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.serving import Predictor

    b = SyntheticCriteo(16, seed=0).batch(0)
    want = Predictor(export).predict(b.sparse, b.dense)
    with tmpfs(tmp_path / "mnt") as mnt:
        shutil.copytree(export, aside_path(mnt / "onnx"))  # an export killed between its two renames
        remount_read_only(mnt)
        np.testing.assert_array_equal(Predictor(mnt / "onnx").predict(b.sparse, b.dense), want)


# ------------------------------------------------------------------ 3. a store opened after a killed swap
def test_a_store_opened_after_a_killed_swap_is_the_one_set_aside(tmp_path):
    _store(tmp_path / "s")
    os.rename(tmp_path / "s", aside_path(tmp_path / "s"))  # a restore or resume killed between its renames
    with EmbeddingStore(tmp_path / "s") as s:
        assert s.count_rows("a") == len(KEYS)  # not a new empty store
    assert not aside_path(tmp_path / "s").exists()


def test_a_read_only_open_after_a_killed_swap_reads_the_copy_and_moves_nothing(tmp_path):
    _store(tmp_path / "s")
    os.rename(tmp_path / "s", aside_path(tmp_path / "s"))
    with EmbeddingStore(tmp_path / "s", read_only=True) as r:
        assert r.stats().table_rows == {"a": len(KEYS)}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.old"]  # a reader writes nothing
    assert main(["inspect", "--store", str(tmp_path / "s")]) == 0


# ------------------------------------------------------------------ 4. a failed creation leaves no store folder
def test_train_on_a_full_disk_leaves_no_new_store_folder(tmp_path, capsys):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        fill(mnt)
        rc = main([*TRAIN, "--store", str(mnt / "new" / "st")])
        err = capsys.readouterr().err
        assert rc == 3, err
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast"], err


def test_a_store_that_cannot_be_created_leaves_nothing_behind(tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        fill(mnt)
        with pytest.raises(DamoHybridError):
            EmbeddingStore(mnt / "a" / "b" / "s", [TableConfig("a", 4)])
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast"]
        (mnt / "kept").mkdir()  # a folder that was there before stays
        with pytest.raises(DamoHybridError):
            EmbeddingStore(mnt / "kept", [TableConfig("a", 4)])
        assert (mnt / "kept").is_dir()


def test_a_locked_store_is_not_removed_by_the_open_that_lost(tmp_path):
    with EmbeddingStore(tmp_path / "s", [TableConfig("a", 4)]):
        with pytest.raises(DamoHybridError, match="locked"):
            EmbeddingStore(tmp_path / "s")
        assert (tmp_path / "s" / "meta.json").is_file()


# ------------------------------------------------------------------ 5. outputs written beside and renamed
BIG = {"padding": "x" * 400_000}


@pytest.fixture
def full_disk_with_old_report(tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        (mnt / "r.json").write_text('{"old": true}')
        fill(mnt)
        yield mnt / "r.json"


def _keeps_old(report: Path) -> None:
    assert json.loads(report.read_text()) == {"old": True}
    assert [p.name for p in report.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_bench_json_on_a_full_disk_keeps_the_old_report(monkeypatch, capsys, full_disk_with_old_report):
    import damo_hybrid.bench.compression as bc

    monkeypatch.setattr(bc, "run_compression_study", lambda *a, **k: {"datasets": {}, **BIG})
    assert main(["bench", "--compression", "--datasets", "synthetic", "--json", str(full_disk_with_old_report)]) == 3
    assert "No space left" in capsys.readouterr().err
    _keeps_old(full_disk_with_old_report)


def test_store_bench_json_on_a_full_disk_keeps_the_old_report(monkeypatch, tmp_path, capsys, full_disk_with_old_report):
    import damo_hybrid.bench.store as bs

    monkeypatch.setattr(bs, "bench_store", lambda *a, **k: BIG)
    rc = main(["bench", "--rows", "100", "--dims", "4", "--batches", "10", "--repeats", "1", "--dir", str(tmp_path),
               "--json", str(full_disk_with_old_report)])
    assert rc == 3, capsys.readouterr().err
    _keeps_old(full_disk_with_old_report)


def test_write_criteo_on_a_full_disk_keeps_the_old_file(tmp_path):
    from damo_hybrid.bench.loader import write_criteo_file

    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        for name in ("c.tsv", "c.tsv.gz"):
            (mnt / name).write_text("old\n")
        fill(mnt)
        for name in ("c.tsv", "c.tsv.gz"):
            with pytest.raises(OSError):
                write_criteo_file(mnt / name, 20_000)
            assert (mnt / name).read_text() == "old\n"
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast", "c.tsv", "c.tsv.gz"]
    import gzip

    write_criteo_file(tmp_path / "ok.tsv.gz", 10)
    assert len(gzip.decompress((tmp_path / "ok.tsv.gz").read_bytes()).splitlines()) == 10


# ------------------------------------------------------------------ 6. benchmarks that fail say so
def _compression_result(beats: bool) -> dict:
    runs = [{"method": "full", "ratio": 1.0, "rows": 10, "bytes": 100, "auc": 0.7, "logloss": 0.5, "samples_per_s": 1},
            {"method": "qr_mult", "ratio": 10.0, "rows": 1, "bytes": 10, "auc": 0.69, "logloss": 0.5, "samples_per_s": 1}]
    goals = {"best_at_10x": {"method": "qr_mult", "auc_gap": -0.01, "within_0.002": beats},
             "beats_hashing": {"qr_mult@10x": beats, "dhe@100x": None}}
    return {"datasets": {"synthetic": {"runs": runs, "goals": goals}}}


@pytest.mark.parametrize("beats, status", [(False, 1), (True, 0)])
def test_a_compression_benchmark_that_misses_a_goal_exits_1(monkeypatch, tmp_path, capsys, beats, status):
    import damo_hybrid.bench.compression as bc

    monkeypatch.setattr(bc, "run_compression_study", lambda *a, **k: _compression_result(beats))
    assert main(["bench", "--compression", "--datasets", "synthetic", "--json", str(tmp_path / "r.json")]) == status
    err = capsys.readouterr().err
    assert (tmp_path / "r.json").exists()  # the report is written either way
    if not beats:
        (line,) = err.strip().splitlines()
        assert line.startswith("damo-hybrid bench: check failed: ") and len(line) < 300, line
        assert "synthetic" in line and "qr_mult@10x" in line and "0.002" in line, line


def _rank_fails(monkeypatch, exc):
    import torch.multiprocessing as mp

    def start(*a, **k):
        raise exc

    monkeypatch.setattr(mp, "start_processes", start)


@pytest.mark.parametrize("make, status, why", [
    (lambda s: s.ProcessExitedException("process 1 terminated with signal SIGKILL", 1, 4242, -9, "SIGKILL"), 3,
     r"rank 1 of 2 .*SIGKILL"),
    (lambda s: s.ProcessExitedException("process 0 terminated with exit code 5", 0, 4242, 5), 3,
     r"rank 0 of 2 .*exit status 5"),
    (lambda s: s.ProcessRaisedException(
        "\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n  File \"x.py\", "
        "line 1, in <module>\n    f()\nValueError: the table config is bad\n", 1, 4242), 2,
     r"rank 1 of 2 .*ValueError: the table config is bad"),
    (lambda s: s.ProcessRaisedException(
        "\n\n-- Process 0 terminated with the following error:\nTraceback (most recent call last):\n  File \"x.py\", "
        "line 1\nOSError: [Errno 28] No space left on device: '/tmp/x'\n", 0, 4242), 3, r"rank 0 of 2 .*No space left"),
], ids=["killed", "exited", "raised", "raised-system"])
def test_a_failed_rank_of_bench_dist_is_one_line(monkeypatch, capsys, make, status, why):
    import importlib

    _rank_fails(monkeypatch, make(importlib.import_module("torch.multiprocessing.spawn")))
    rc = main(["bench", "--dist"])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert rc == status, line
    assert line.startswith("damo-hybrid bench: error: ") and len(line) < 300, line
    assert __import__("re").search(why, line), line


@pytest.fixture
def soak(monkeypatch):
    spec = importlib.util.spec_from_file_location("soak_under_test", ROOT / "benchmarks" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def never(*a, **k):
        raise AssertionError("the soak ran although its arguments are bad")

    monkeypatch.setattr(mod, "run", never)
    return mod


@pytest.mark.parametrize("args, why", [
    (["--keys", "-5"], "--keys"), (["--keys", "1.5"], "--keys"), (["--keys", "inf"], "--keys"),
    (["--cache-mb", "-1"], "--cache-mb"), (["--cache-mb", "nan"], "--cache-mb"), (["--batch", "0"], "--batch"),
    (["--fresh", "0"], "--fresh"), (["--fresh", "2"], "--fresh"), (["--dim", "0"], "--dim"),
    (["--dim", "x"], "--dim"), (["--sample-every", "0"], "--sample-every"), (["--dir", "/no/such/folder"], "--dir"),
])
def test_soak_checks_its_arguments_in_one_line(soak, capsys, args, why):
    with pytest.raises(SystemExit) as e:
        soak.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and len(err[0]) < 300, err


def test_soak_out_on_a_full_disk_keeps_the_old_file(soak, monkeypatch, full_disk_with_old_report):
    sample = {"rss_anon_mb": 1.0}
    monkeypatch.setattr(soak, "run", lambda *a, **k: {"keys": 1, "elapsed_s": 1.0, "samples": [sample], "disk_bytes": 1,
                                                      "rows_stored": 1, "expected_bytes_per_row": 1, **BIG})
    with pytest.raises(OSError):
        soak.main(["--keys", "10", "--out", str(full_disk_with_old_report)])
    _keeps_old(full_disk_with_old_report)


# ------------------------------------------------------------------ 7. output into a closed pipe
def _into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first byte
    try:
        return subprocess.run([sys.executable, "-m", "damo_hybrid.cli", *args], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=300, cwd=ROOT)
    finally:
        os.close(w)


@pytest.mark.parametrize("args, status", [
    (["inspect", "--store", "{s}"], 141), (["inspect", "--store", "{s}", "--json"], 141),
    (["--help"], 0),  # argparse itself drops a failed write of its help, then exits 0
])
def test_output_into_a_closed_pipe_stops_quietly_with_status_141(tmp_path, args, status):
    _store(tmp_path / "s")
    p = _into_closed_pipe(*[a.format(s=tmp_path / "s") for a in args])
    assert p.returncode == status, p.stderr
    assert p.stderr == "", p.stderr


def test_a_reader_that_stops_after_one_line_ends_the_command_quietly(tmp_path):
    EmbeddingStore(tmp_path / "s", [TableConfig(f"t{i}", 4) for i in range(400)]).close()  # ~380 kB of JSON
    proc = subprocess.Popen([sys.executable, "-m", "damo_hybrid.cli", "inspect", "--store", str(tmp_path / "s"),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    first = proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`, while the command still writes
    err = proc.stderr.read()
    proc.wait(timeout=300)
    assert first == "{\n" and proc.returncode == 141, err
    assert err == "", err


# ------------------------------------------------------------------ 8. RocksDB's messages, clipped
def test_a_rocksdb_error_under_a_long_path_is_short_and_names_the_file(tmp_path):
    deep = tmp_path.joinpath(*["d" * 40] * 4) / "store"
    _store(deep)
    manifest = next(p for p in (deep / "db").iterdir() if p.name.startswith("MANIFEST-"))
    manifest.unlink()
    for read_only in (False, True):
        with pytest.raises(DamoHybridError) as e:
            EmbeddingStore(deep, read_only=read_only)
        msg = str(e.value)
        assert len(msg) < 300 and "\n" not in msg, f"{len(msg)}: {msg}"
        assert manifest.name in msg and "No such file or directory" in msg and "store" in msg, msg


def test_a_rocksdb_error_keeps_what_the_boundary_reads_from_it():
    from damo_hybrid.cli.failure import SYSTEM, explain
    from damo_hybrid.storage.rocksdb import _translate

    path = "/data/" + "x" * 280 + "/db"
    e = _translate(RuntimeError(f"IO error: While appending to file: {path}/000012.log: Read-only file system"),
                   path, "write")
    assert len(str(e)) < 300 and "000012.log" in str(e) and "Read-only file system" in str(e), str(e)
    assert explain(e, "train").status == SYSTEM


def test_status_141_is_documented():
    from damo_hybrid.cli import failure

    for page in ("cli.md", "troubleshooting.md"):
        assert f"| {failure.SIGPIPE} |" in (ROOT / "docs" / page).read_text(), page
