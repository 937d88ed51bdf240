"""Issue 28, class 8: an error names the file, the line or byte, and the cause, in one line of
fewer than 300 characters, whatever the input holds (binary bytes, mislabelled gzip, a huge
value, a damaged RocksDB file)."""

from __future__ import annotations

import gzip
import os
import re

import numpy as np
import pytest

from damo_hybrid.cli import main

LIMIT = 300
CRITEO_LINE = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["a1b2"] * 26) + "\n"
CSV_TOML = ('[schema]\ncolumns = ["label", "x", "user"]\nlabel = "label"\ndense = ["x"]\nsparse = ["user"]\n'
            'int_sparse = ["user"]\nheader = false\n')


def _one_line(capsys, argv, why):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, [e[:200] for e in err]
    assert len(err[0]) < LIMIT, f"{len(err[0])} characters: {err[0][:400]}"
    assert re.search(why, err[0]), err[0]
    assert "Traceback" not in err[0]
    return err[0]


def _train(tmp_path, *args):
    return ["train", "--quiet", "--steps", "2", "--batch-size", "16", "--dim", "4", "--store", str(tmp_path / "s"), *args]


def _gzipped_text(n=3000):
    return gzip.compress((CRITEO_LINE * n).encode())


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "loaded"])
@pytest.mark.parametrize("name, content, why", [
    ("bin.tsv", lambda: os.urandom(70_000), r"bin\.tsv:\d+: .*not UTF-8 text"),
    ("plain.tsv", _gzipped_text, r"plain\.tsv: holds gzip-compressed data but its name does not end in \.gz"),
    ("fake.tsv.gz", lambda: CRITEO_LINE.encode() * 100, r"fake\.tsv\.gz: not gzip data"),
    ("cut.tsv.gz", lambda: _gzipped_text(20000)[:5000], r"cut\.tsv\.gz:\d+: unreadable after \d+ lines"),
], ids=["binary", "gzip-named-tsv", "tsv-named-gz", "truncated-gz"])
def test_unreadable_files_are_one_short_line_naming_the_file(tmp_path, capsys, stream, name, content, why):
    (tmp_path / name).write_bytes(content())
    _one_line(capsys, _train(tmp_path, "--data", str(tmp_path / name), *(["--stream"] if stream else [])), why)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "loaded"])
def test_a_binary_libfm_file_is_one_short_line(tmp_path, capsys, stream):
    (tmp_path / "bin.libfm").write_bytes(b"1 3:1\n" + os.urandom(50_000))
    _one_line(capsys, _train(tmp_path, "--format", "libfm", "--data", str(tmp_path / "bin.libfm"),
                             *(["--stream"] if stream else [])), r"bin\.libfm:\d+: .*not UTF-8 text")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "loaded"])
@pytest.mark.parametrize("line, why", [
    ("x" * 100_000 + ",1,7\n", r"d\.csv:2: label 'xxxx.*' is not a number"),
    ("1,1," + "9" * 100_000 + "\n", r"d\.csv:2: user value '9999.*' is not an int64 id"),
    ("1,1,7" + ",z" * 50_000 + "\n", r"d\.csv:2: 50003 columns, expected 3"),
], ids=["long-label", "long-id", "many-columns"])
def test_a_huge_bad_value_is_clipped_in_the_message(tmp_path, capsys, stream, line, why):
    (tmp_path / "c.toml").write_text(CSV_TOML)
    (tmp_path / "d.csv").write_text("0,1,5\n" + line)
    msg = _one_line(capsys, _train(tmp_path, "--config", str(tmp_path / "c.toml"), "--format", "csv", "--data",
                                   str(tmp_path / "d.csv"), *(["--stream"] if stream else [])), why)
    assert "..." in msg or "columns" in msg


def test_parquet_errors_are_one_short_line(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "c.toml").write_text('[schema]\ncolumns = []\nlabel = "label"\ndense = ["x"]\nsparse = ["user", '
                                     + ", ".join(f'"c{i:03d}"' for i in range(60)) + "]\n")
    (tmp_path / "junk.parquet").write_bytes(os.urandom(5000))
    pq.write_table(pa.table({"label": [1, 0], "x": [1.0, 2.0], "user": [7, 8]}), tmp_path / "few.parquet")
    for stream in ([], ["--stream"]):
        for name, why in (("junk.parquet", r"junk\.parquet: cannot read"),
                          ("few.parquet", r"few\.parquet: cannot read columns .*c000")):
            _one_line(capsys, _train(tmp_path, "--config", str(tmp_path / "c.toml"), "--format", "parquet",
                                     "--data", str(tmp_path / name), *stream), why)


def test_config_errors_with_huge_values_are_clipped(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[train]\nlr = "{"7" * 20000}"\n')
    _one_line(capsys, ["train", "--config", str(cfg)], r"run\.toml: \[train\] lr = '7777.*\.\.\.")
    cfg.write_text(f'[train]\nmodel = "{"m" * 20000}"\n')
    _one_line(capsys, ["train", "--config", str(cfg)], r"run\.toml: \[train\] model = 'mmm.*\.\.\.")
    cfg.write_bytes(b"[train]\n" + os.urandom(20000))
    _one_line(capsys, ["train", "--config", str(cfg)], r"run\.toml: not a TOML text file")
    cfg.write_text(f'[train]\nsteps = 2\n{"k" * 20000} = 1\n')
    _one_line(capsys, ["train", "--config", str(cfg)], r"run\.toml: unknown \[train\] keys")
    _one_line(capsys, ["train", "--table-compression", "qr:" + "x" * 20000], r"--table-compression: qr takes")


# ---------------------------------------------------------------- RocksDB damage
def _store_with_damaged_sst(tmp_path):
    from damo_hybrid import EmbeddingStore, OptimizerConfig, TableConfig

    t = TableConfig("emb", 8, optimizer=OptimizerConfig.sgd(lr=0.1))
    keys = np.arange(1, 20001, dtype=np.uint64)
    with EmbeddingStore(tmp_path / "st", [t]) as s:
        s.apply_gradients("emb", keys, np.ones((len(keys), 8), np.float32))
    ssts = sorted((tmp_path / "st" / "db").glob("*.sst"))
    assert ssts
    for f in ssts:
        b = bytearray(f.read_bytes())
        for i in range(64, min(len(b) - 64, 200_000), 997):
            b[i] ^= 0xFF
        f.write_bytes(bytes(b))
    return tmp_path / "st"


@pytest.mark.parametrize("cmd", [["export", "--out", "{t}/w.npz"], ["dump", "--out", "{t}/d.npz"]])
def test_a_damaged_rocksdb_file_names_the_store_and_the_cause_not_key_0(tmp_path, capsys, cmd):
    st = _store_with_damaged_sst(tmp_path)
    msg = _one_line(capsys, [cmd[0], "--store", str(st), *[a.replace("{t}", str(tmp_path)) for a in cmd[1:]]],
                    r"(?i)corrupt|checksum|damaged")
    assert "key 0 " not in msg and "at key 0" not in msg, msg
    assert str(st) in msg, msg


def test_a_corrupt_value_names_the_store(tmp_path):
    import rocksdict

    from damo_hybrid import EmbeddingStore, OptimizerConfig, TableConfig
    from damo_hybrid.errors import CorruptRowError
    from damo_hybrid.storage.backend import encode_keys

    t = TableConfig("emb", 4, optimizer=OptimizerConfig.sgd(lr=0.1))
    keys = np.array([3, 5], np.uint64)
    with EmbeddingStore(tmp_path / "s", [t]) as s:
        s.apply_gradients("emb", keys, np.ones((2, 4), np.float32))
    db = rocksdict.Rdict(str(tmp_path / "s" / "db"), rocksdict.Options(raw_mode=True))
    k = encode_keys(1, keys[1:])[0]
    db[k] = db[k][:-3]
    db.close()
    with EmbeddingStore(tmp_path / "s") as s:
        with pytest.raises(CorruptRowError, match=r"store .*s\b.*'emb' at key 5 .*bytes, expected") as ei:
            s.lookup("emb", keys)
        assert len(str(ei.value)) < LIMIT
        with pytest.raises(CorruptRowError, match=r"store .*'emb' at key 5"):
            list(s.scan("emb"))
