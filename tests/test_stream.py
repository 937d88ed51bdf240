"""The streaming reader equals the line reader: the same rows and keys, errors at the same lines,
exact resume from any batch, several files, in flat memory."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damo_hybrid.data.readers import read_dataset
from damo_hybrid.data.schema import FORMATS, DenseMode, OnError, Schema
from damo_hybrid.data.stream import DelimitedStream, Position

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CRITEO = FORMATS["criteo"]


def _criteo_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dense = ["" if rng.random() < 0.2 else str(int(rng.integers(0, 5000))) for _ in range(13)]
        sparse = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)):08x}"[: int(rng.integers(1, 9))]
                  for _ in range(26)]
        out.append("\t".join([str(int(rng.integers(0, 2))), *dense, *sparse]))
    return out


def _all(stream: DelimitedStream, start: Position = Position()):
    batches = list(stream.batches(start))
    b = [x for x, _ in batches]
    keys = {f: np.concatenate([x.sparse[f] for x in b]) for f in b[0].sparse}
    return keys, np.concatenate([x.dense for x in b]), np.concatenate([x.label for x in b]), batches


def _same(stream: DelimitedStream, data) -> None:
    keys, dense, label, _ = _all(stream)
    assert list(keys) == data.sparse_fields and stream.dense_fields == data.dense_fields
    for f in keys:
        np.testing.assert_array_equal(keys[f], data.sparse[f], err_msg=f)
    np.testing.assert_array_equal(dense, data.dense)
    np.testing.assert_array_equal(label, data.label)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("mode", list(DenseMode))
def test_same_rows_and_keys_as_the_line_reader(tmp_path, gz, mode):
    text = ("\n".join(_criteo_lines(3000)) + "\n").encode()
    p = tmp_path / ("d.tsv.gz" if gz else "d.tsv")
    p.write_bytes(gzip.compress(text) if gz else text)
    schema = Schema(**{**CRITEO.__dict__, "dense_mode": mode})
    stream = DelimitedStream(p, schema, batch_size=256, block_mb=0.05)  # many blocks, batches across them
    _same(stream, read_dataset(p, "csv", 256, schema))


@pytest.mark.skipif(not (SHARED / "criteo_dac_head8k" / "criteo_train.tsv.gz").exists(), reason="no shared Criteo sample")
def test_the_real_criteo_sample(tmp_path):
    p = SHARED / "criteo_dac_head8k" / "criteo_train.tsv.gz"
    _same(DelimitedStream(p, CRITEO, 1000, block_mb=0.25), read_dataset(p, "criteo", 1000))


@pytest.mark.skipif(not (SHARED / "avazu_head9k" / "avazu_train.csv.gz").exists(), reason="no shared Avazu sample")
def test_the_real_avazu_sample(tmp_path):
    p = SHARED / "avazu_head9k" / "avazu_train.csv.gz"
    _same(DelimitedStream(p, FORMATS["avazu"], 1000, block_mb=0.25), read_dataset(p, "avazu", 1000))


def test_resume_from_any_batch_gives_the_same_rest(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"part-{i}.tsv"
        p.write_text("\n".join(_criteo_lines(700, seed=i)) + "\n")
        paths.append(p)
    stream = DelimitedStream(tmp_path, CRITEO, batch_size=300, block_mb=0.03)
    _, _, label, batches = _all(stream)
    assert len(label) == 2100
    for k in (0, 1, 3, 4, len(batches) - 2):
        rest = list(stream.batches(batches[k][1]))
        assert len(rest) == len(batches) - k - 1
        for (a, pa), (b, pb) in zip(rest, batches[k + 1:]):
            np.testing.assert_array_equal(a.label, b.label)
            np.testing.assert_array_equal(a.sparse["C3"], b.sparse["C3"])
            assert pa == pb


def test_header_bom_crlf_and_blank_lines(tmp_path):
    rows = _criteo_lines(50)
    text = "\ufeff" + "\t".join(CRITEO.columns) + "\r\n" + "\r\n".join(rows[:20]) + "\r\n\r\n" + "\r\n".join(rows[20:])
    p = tmp_path / "h.tsv"
    p.write_bytes(text.encode())
    schema = Schema(**{**CRITEO.__dict__, "header": None})
    _same(DelimitedStream(p, schema, 16, block_mb=0.005), read_dataset(p, "csv", 16, schema))


def _err(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["ok", "short", "label2", "nan", "word", "blank", "neg"]), min_size=1, max_size=60),
       st.sampled_from([OnError.RAISE, OnError.SKIP]))
def test_bad_lines_fail_or_skip_at_the_same_lines(tmp_path_factory, kinds, policy):
    good = _criteo_lines(len(kinds), seed=7)
    lines = []
    for k, line in zip(kinds, good):
        parts = line.split("\t")
        if k == "short":
            parts = parts[:-1]
        elif k == "label2":
            parts[0] = "2"
        elif k == "nan":
            parts[3] = "nan"
        elif k == "word":
            parts[5] = "x1"
        elif k == "neg":
            parts[2] = "-3"
        lines.append("" if k == "blank" else "\t".join(parts))
    p = tmp_path_factory.mktemp("fuzz") / "f.tsv"
    p.write_text("\n".join(lines) + "\n")
    schema = Schema(**{**CRITEO.__dict__, "on_error": policy})
    stream = DelimitedStream(p, schema, 7, block_mb=0.002)
    ref_err = _err(lambda: read_dataset(p, "csv", 7, schema))
    if ref_err is not None and "holds no" in ref_err:  # an all-bad file: the line reader refuses it whole
        assert not list(stream.batches()) and stream.skipped == sum(k not in ("ok", "blank", "neg") for k in kinds)
        return
    got_err = _err(lambda: _all(stream))
    assert got_err == ref_err
    if ref_err is None:
        _same(DelimitedStream(p, schema, 7, block_mb=0.002), read_dataset(p, "csv", 7, schema))


def _fnv_reference(b: bytes) -> int:
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=50))
def test_packed_fnv_equals_the_byte_loop(values):
    """Both vectorized layouts (masked for short strings, sorted by length for long ones)."""
    from damo_hybrid.keys.hashing import fnv1a64

    for vals in (values, [v[:8] for v in values]):
        assert [int(h) for h in fnv1a64(vals)] == [_fnv_reference(v) for v in vals]


def test_loader_benchmark_reads_every_row_it_wrote(tmp_path):
    from damo_hybrid.bench.loader import run_loader_bench

    res = run_loader_bench(rows=3000, repeats=1, root=str(tmp_path), log=lambda _: None)
    for fmt in ("tsv", "tsv.gz", "parquet"):
        r = res["formats"][fmt]
        assert r["rows_per_s"] > 0 and r["rss_peak_mb"] >= r["rss_at_10pct_mb"] > 0
    assert not list(tmp_path.iterdir())  # its files are gone


def _cli_rows(store):
    from damo_hybrid import EmbeddingStore

    with EmbeddingStore(store, read_only=True) as st:
        keys = np.concatenate([k for k, _ in st.scan("emb")])
        return keys, st.lookup("emb", keys)


def test_train_stream_equals_train_on_the_loaded_file(tmp_path):
    import json

    from damo_hybrid.cli import main

    (tmp_path / "a.tsv").write_text("\n".join(_criteo_lines(1100, seed=1)) + "\n")
    (tmp_path / "e.tsv").write_text("\n".join(_criteo_lines(300, seed=2)) + "\n")
    args = ["train", "--data", str(tmp_path / "a.tsv"), "--eval-data", str(tmp_path / "e.tsv"), "--epochs", "2",
            "--batch-size", "256", "--dim", "4", "--quiet", "--threads", "1"]
    assert main([*args, "--stream", "--store", str(tmp_path / "s"), "--json", str(tmp_path / "s.json")]) == 0
    assert main([*args, "--store", str(tmp_path / "n"), "--json", str(tmp_path / "n.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "sn")
    assert a["steps"] == b["steps"] == 10  # 2 epochs of ceil(1100 / 256) batches
    assert (a["auc"], a["logloss"], a["train_logloss"]) == (b["auc"], b["logloss"], b["train_logloss"])
    (ka, wa), (kb, wb) = _cli_rows(tmp_path / "s"), _cli_rows(tmp_path / "n")
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_array_equal(wa, wb)


def test_train_stream_resumes_from_its_checkpointed_position(tmp_path):
    from damo_hybrid.cli import main
    from damo_hybrid.pipeline.checkpoint import latest_checkpoint, load_trainer_state

    (tmp_path / "a.tsv").write_text("\n".join(_criteo_lines(1100, seed=1)) + "\n")
    args = ["train", "--data", str(tmp_path / "a.tsv"), "--stream", "--batch-size", "256", "--dim", "4", "--quiet",
            "--threads", "1", "--checkpoint-every", "3", "--eval-batches", "0"]
    assert main([*args, "--steps", "9", "--store", str(tmp_path / "ref")]) == 0
    assert main([*args, "--steps", "6", "--store", str(tmp_path / "b")]) == 0
    state = load_trainer_state(latest_checkpoint(tmp_path / "b.ckpt"))
    assert state["data"]["index"] == 6 and state["data"]["epoch"] == 1  # batch 6 opens the second epoch
    assert main([*args, "--steps", "9", "--store", str(tmp_path / "b"), "--resume"]) == 0
    (ka, wa), (kb, wb) = _cli_rows(tmp_path / "ref"), _cli_rows(tmp_path / "b")
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_allclose(wa, wb, rtol=1e-6, atol=1e-7)


def test_stream_source_ends_after_its_epochs_and_rereads_on_demand(tmp_path):
    from damo_hybrid.data.source import EndOfData, StreamSource

    (tmp_path / "a.tsv").write_text("\n".join(_criteo_lines(500, seed=3)) + "\n")
    src = StreamSource(DelimitedStream(tmp_path / "a.tsv", CRITEO, 200), epochs=2)
    labels = [src(i).label for i in range(6)]  # 3 batches per epoch (200, 200, 100)
    assert [len(x) for x in labels] == [200, 200, 100] * 2
    np.testing.assert_array_equal(labels[0], labels[3])
    with pytest.raises(EndOfData):
        src(6)
    np.testing.assert_array_equal(src(1).label, labels[1])  # asked again: read from the epoch's top


def test_a_hashed_holdout_splits_the_rows_once_and_resumes(tmp_path):
    from damo_hybrid.data.stream import Holdout

    for i in range(2):
        (tmp_path / f"p{i}.tsv").write_text("\n".join(_criteo_lines(900, seed=10 + i)) + "\n")
    whole = _all(DelimitedStream(tmp_path, CRITEO, 128, block_mb=0.02))[0]["C1"]
    sides = [DelimitedStream(tmp_path, CRITEO, 128, block_mb=0.02, holdout=Holdout(0.2, held, seed=3))
             for held in (False, True)]
    train, held = (_all(s)[0]["C1"] for s in sides)
    assert len(train) + len(held) == len(whole) == 1800 and 0.15 < len(held) / 1800 < 0.25
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.sort(whole))  # a partition
    batches = _all(sides[0])[3]
    for k in (0, 4, 9):  # resuming mid-file keeps the ordinals the split hashes
        rest = [b.sparse["C1"] for b, _ in sides[0].batches(batches[k][1])]
        np.testing.assert_array_equal(np.concatenate(rest), np.concatenate([b.sparse["C1"] for b, _ in batches[k + 1:]]))


def test_a_short_epoch_is_noted_with_a_batch_size_to_use(tmp_path, capsys):
    from damo_hybrid.cli.data import short_epoch_note

    short_epoch_note(8000, 4096, "train.tsv")
    out = capsys.readouterr().out
    assert "2 step(s) at --batch-size 4096" in out and "--batch-size 128 gives 63 steps" in out
    short_epoch_note(8000, 128, "train.tsv")
    assert capsys.readouterr().out == ""


def test_a_shuffle_buffer_permutes_windows_reproducibly_and_resumes(tmp_path):
    for i in range(2):
        (tmp_path / f"p{i}.tsv").write_text("\n".join(_criteo_lines(650, seed=20 + i)) + "\n")
    plain = _all(DelimitedStream(tmp_path, CRITEO, 100, block_mb=0.02))[0]["C2"]

    def shuffled(seed):
        return DelimitedStream(tmp_path, CRITEO, 100, block_mb=0.02, shuffle_buffer=300, seed=seed)

    a, b, c = (_all(shuffled(s))[0]["C2"] for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, plain)
    for w in range(0, 1300, 300):  # each window of 300 rows is a permutation of the same rows in file order
        np.testing.assert_array_equal(np.sort(a[w:w + 300]), np.sort(plain[w:w + 300]))
    batches = _all(shuffled(5))[3]
    for k in (0, 2, 5, 8, len(batches) - 2):
        rest = [x.sparse["C2"] for x, _ in shuffled(5).batches(batches[k][1])]
        np.testing.assert_array_equal(np.concatenate(rest),
                                      np.concatenate([x.sparse["C2"] for x, _ in batches[k + 1:]]))


def test_resuming_with_another_shuffle_is_refused(tmp_path, capsys):
    from damo_hybrid.cli import main

    (tmp_path / "a.tsv").write_text("\n".join(_criteo_lines(600, seed=1)) + "\n")
    args = ["train", "--data", str(tmp_path / "a.tsv"), "--batch-size", "128", "--dim", "4", "--quiet",
            "--threads", "1", "--eval-batches", "0", "--store", str(tmp_path / "s")]
    assert main([*args, "--shuffle-buffer", "256"]) == 2
    assert "add --stream" in capsys.readouterr().err
    assert main([*args, "--stream", "--shuffle-buffer", "256", "--steps", "4", "--checkpoint-every", "2"]) == 0
    assert main([*args, "--stream", "--shuffle-buffer", "512", "--steps", "6", "--resume"]) == 2
    assert "--shuffle-buffer 256 (this run: 512)" in capsys.readouterr().err  # the run's identity speaks first
    assert main([*args, "--stream", "--shuffle-buffer", "512", "--steps", "6", "--resume", "--allow-run-change"]) == 2
    assert "same --shuffle-buffer and --seed" in capsys.readouterr().err  # the stream cannot continue another way
    with __import__("damo_hybrid").EmbeddingStore(tmp_path / "s", read_only=True) as st:  # refused before the store changed
        assert st.step("emb") == 4


def _parquet(path, lines, row_group, bad_label_at=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [ln.split("\t") for ln in lines]
    cols = {"label": pa.array([int(p[0]) for p in parts], pa.int8())}
    if bad_label_at is not None:
        cols["label"] = pa.array([2 if i == bad_label_at else int(p[0]) for i, p in enumerate(parts)], pa.int8())
    for j in range(13):
        cols[f"I{j + 1}"] = pa.array([int(p[1 + j]) if p[1 + j] else None for p in parts], pa.int32())
    for j in range(26):
        cols[f"C{j + 1}"] = pa.array([p[14 + j] or None for p in parts], pa.string())
    cols["uid"] = pa.array(np.arange(len(parts), dtype=np.int64) * 7919)
    pq.write_table(pa.table(cols), path, row_group_size=row_group)


PQ_SCHEMA = Schema((), "label", CRITEO.dense, (*CRITEO.sparse, "uid"))


def test_parquet_streams_by_row_group_with_the_loaded_readers_keys_and_resumes(tmp_path):
    from damo_hybrid.data.parquet_stream import ParquetStream

    _parquet(tmp_path / "a.parquet", _criteo_lines(1000, seed=4), row_group=170)
    stream = ParquetStream(tmp_path / "a.parquet", PQ_SCHEMA, 128)
    _same(stream, read_dataset(tmp_path / "a.parquet", "parquet", 128, PQ_SCHEMA))
    batches = _all(stream)[3]
    for k in (0, 3, 6):
        rest = [x.sparse["uid"] for x, _ in stream.batches(batches[k][1])]
        np.testing.assert_array_equal(np.concatenate(rest), np.concatenate([x.sparse["uid"] for x, _ in batches[k + 1:]]))
    _parquet(tmp_path / "bad.parquet", _criteo_lines(400, seed=4), row_group=100, bad_label_at=250)
    want = _err(lambda: read_dataset(tmp_path / "bad.parquet", "parquet", 128, PQ_SCHEMA))
    assert want is not None and ":251:" in want
    assert _err(lambda: _all(ParquetStream(tmp_path / "bad.parquet", PQ_SCHEMA, 128))) == want


def test_closing_a_read_ahead_early_stops_its_thread_at_once():
    """The producer finished while the queue was full: closing must not wait for a put that
    nobody will take (it stalled the close for seconds and left the thread behind)."""
    import threading
    import time

    from damo_hybrid.data.files import ahead

    it = ahead(iter([1, 2]), depth=1, name="damo-test-ahead")
    assert next(it) == 1
    time.sleep(0.3)  # the producer has put 2 and now offers its end marker to a full queue
    t0 = time.perf_counter()
    it.close()
    assert time.perf_counter() - t0 < 1.0
    time.sleep(0.3)
    assert not any(t.name == "damo-test-ahead" for t in threading.enumerate())


def test_a_stream_split_by_file_reads_only_its_files_and_holds_out_the_same_rows(tmp_path):
    from damo_hybrid.data.stream import Holdout

    for i in range(5):
        (tmp_path / f"p{i}.tsv").write_text("\n".join(_criteo_lines(300 + 50 * i, seed=20 + i)) + "\n")
    for held in (False, True):
        split = Holdout(0.25, held, seed=5)
        whole = DelimitedStream(tmp_path, CRITEO, 64, block_mb=0.02, holdout=split)
        parts = [DelimitedStream(tmp_path, CRITEO, 32, block_mb=0.02, holdout=split, part=(r, 2)) for r in range(2)]
        assert [p.name for p in parts[0].paths] == ["p0.tsv", "p2.tsv", "p4.tsv"]
        assert [p.name for p in parts[1].paths] == ["p1.tsv", "p3.tsv"]
        got = np.concatenate([_all(p)[0]["C1"] for p in parts])  # each side of the split, file by file
        by_file = {r: _all(p)[0]["C1"] for r, p in enumerate(parts)}
        np.testing.assert_array_equal(np.sort(got), np.sort(_all(whole)[0]["C1"]))
        assert len(by_file[0]) and len(by_file[1])
    assert sum(len(DelimitedStream(tmp_path, CRITEO, 32, part=(r, 6)).paths) for r in range(6)) >= 6  # by bytes


def test_a_stream_split_by_byte_range_reads_its_lines_once_and_resumes_inside_its_part(tmp_path):
    """Fewer files than ranks: each rank reads its 1/W of the bytes, cut at line starts; in rank
    order the parts are the whole stream, and nothing before a part is read unless a line number
    is needed."""
    from damo_hybrid.data.stream import Holdout

    (tmp_path / "a.tsv").write_text("\n".join(_criteo_lines(700, seed=31)) + "\n")
    (tmp_path / "b.tsv").write_text("\n".join(_criteo_lines(200, seed=32)))  # no final newline
    whole = _all(DelimitedStream(tmp_path, CRITEO, 64, block_mb=0.02))
    parts = [DelimitedStream(tmp_path, CRITEO, 50, block_mb=0.02, part=(r, 3)) for r in range(3)]
    got = [_all(p) for p in parts]
    assert [len(g[2]) for g in got] != [300, 300, 300] and min(len(g[2]) for g in got) > 200  # cut by bytes
    for f in whole[0]:
        np.testing.assert_array_equal(np.concatenate([g[0][f] for g in got]), whole[0][f])
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), whole[1])
    assert all(p._bases == {} for p in parts)  # the bytes before a part were never read
    # resuming inside a part gives the rest of it
    pos = got[1][3][2][1]
    rest = _all(DelimitedStream(tmp_path, CRITEO, 50, block_mb=0.02, part=(1, 3)), pos)
    np.testing.assert_array_equal(rest[0]["C3"], got[1][0]["C3"][150:])
    # the held-out split: each rank's two sides partition its rows
    for r in range(3):
        sides = [_all(DelimitedStream(tmp_path, CRITEO, 50, block_mb=0.02, part=(r, 3), holdout=Holdout(0.3, h, 1)))
                 for h in (False, True)]
        assert 0 < len(sides[1][2]) < len(sides[0][2])
        np.testing.assert_array_equal(np.sort(np.concatenate([s[0]["C1"] for s in sides])), np.sort(got[r][0]["C1"]))
    # an error names the line's number in the file, not in the part
    lines = _criteo_lines(600, seed=33)
    lines[500] = "2" + lines[500][1:]  # a label that is not 0/1
    (tmp_path / "a.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.tsv").unlink()
    err = _err(lambda: _all(DelimitedStream(tmp_path / "a.tsv", CRITEO, 50, block_mb=0.02, part=(1, 2))))
    assert err is not None and "a.tsv:501" in err, err
    gz = tmp_path / "c.tsv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(lines[:10]) + "\n")
    with pytest.raises(ValueError, match="compressed and cannot be split by byte range over 2 ranks"):
        DelimitedStream(gz, CRITEO, 32, part=(0, 2))
    with pytest.raises(ValueError, match="too few lines"):
        DelimitedStream(tmp_path / "a.tsv", CRITEO, 32, part=(0, 10**6))
