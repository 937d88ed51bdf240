"""libFM streamed: the same rows and keys as the line reader, errors at the same lines, exact
resume, and train --stream --format libfm equal to training on the loaded file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stream import _err  # the error text a call raises, or None

from damo_hybrid.data.libfm import LibfmStream
from damo_hybrid.data.readers import read_dataset
from damo_hybrid.data.schema import OnError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _lines(n: int, width: int = 10, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join([str(int(rng.choice([-1, 1]))), *(f"{int(rng.integers(0, 50_000))}:1" for _ in range(width))])
            for _ in range(n)]


def _all(stream, start=None):
    batches = list(stream.batches(start) if start is not None else stream.batches())
    b = [x for x, _ in batches]
    return {f: np.concatenate([x.sparse[f] for x in b]) for f in b[0].sparse}, np.concatenate([x.label for x in b]), batches


def _same(stream, data) -> None:
    keys, label, _ = _all(stream)
    assert list(keys) == data.sparse_fields
    for f in keys:
        np.testing.assert_array_equal(keys[f], data.sparse[f], err_msg=f)
    np.testing.assert_array_equal(label, data.label)


@pytest.mark.parametrize("gz", [False, True])
def test_same_rows_and_keys_as_the_line_reader(tmp_path, gz):
    text = ("\n".join(_lines(3000)) + "\n").encode()
    p = tmp_path / ("d.libfm.gz" if gz else "d.libfm")
    p.write_bytes(gzip.compress(text) if gz else text)
    stream = LibfmStream(p, batch_size=256, block_mb=0.03)  # many blocks, batches across them
    assert stream.width == 10 and stream.dense_fields == []
    _same(stream, read_dataset(p, "libfm", 256))


@pytest.mark.skipif(not (SHARED / "frappe_nfm" / "frappe.validation.libfm.gz").exists(), reason="no shared Frappe data")
def test_the_real_frappe_sample():
    p = SHARED / "frappe_nfm" / "frappe.validation.libfm.gz"
    _same(LibfmStream(p, batch_size=512, block_mb=0.2), read_dataset(p, "libfm", 512))


def test_resume_from_any_batch_gives_the_same_rest(tmp_path):
    for i in range(2):
        (tmp_path / f"part-{i}.libfm").write_text("\n".join(_lines(700, seed=i)) + "\n")
    stream = LibfmStream(tmp_path, batch_size=300, block_mb=0.02)
    _, label, batches = _all(stream)
    assert len(label) == 1400
    for k in (0, 1, 2, len(batches) - 2):
        rest = list(stream.batches(batches[k][1]))
        assert len(rest) == len(batches) - k - 1
        for (a, pa), (b, pb) in zip(rest, batches[k + 1:]):
            np.testing.assert_array_equal(a.sparse["f3"], b.sparse["f3"])
            # the same row (its block may be cut elsewhere when reading starts mid-file)
            assert (pa.file, pa.rows + pa.row) == (pb.file, pb.rows + pb.row)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["ok", "short", "nolabel", "word", "blank", "zero", "tabs", "mixed", "cr", "vt"]),
                min_size=1, max_size=50),
       st.sampled_from([OnError.RAISE, OnError.SKIP]))
def test_bad_lines_fail_or_skip_at_the_same_lines(tmp_path_factory, kinds, policy):
    good = _lines(len(kinds) + 1, width=4, seed=3)
    lines = [good[0]]  # a good first line: the width
    for k, line in zip(kinds, good[1:]):
        parts = line.split(" ")
        if k == "short":
            parts = parts[:-1]
        elif k == "nolabel":
            parts[0] = "x"
        elif k == "word":
            parts[2] = "ab:1"
        elif k == "zero":
            parts[0] = "0"
        elif k == "mixed":  # a tab: whitespace to the line reader (one feature too many), part of a value to pyarrow
            parts[1] = parts[1] + "\t9:1"
        elif k == "vt":
            parts[3] = parts[3] + "\x0b9:1"
        elif k == "cr":  # a lone \r: a line break to pyarrow (two good rows), whitespace to the line reader
            parts = [*parts, "\r" + parts[0], *parts[1:]]
        lines.append("" if k == "blank" else ("\t".join(parts) if k == "tabs" else " ".join(parts)))
    p = tmp_path_factory.mktemp("fuzz") / "f.libfm"
    p.write_text("\n".join(lines) + "\n")
    stream = LibfmStream(p, 7, on_error=policy, block_mb=0.002)
    ref_err = _err(lambda: read_dataset(p, "libfm", 7, _schema(policy)))
    assert _err(lambda: _all(stream)) == ref_err
    if ref_err is None:
        _same(LibfmStream(p, 7, on_error=policy, block_mb=0.002), read_dataset(p, "libfm", 7, _schema(policy)))


def _schema(policy):
    from damo_hybrid.data.libfm import libfm_schema

    return libfm_schema(4, policy)


def test_train_stream_equals_train_on_the_loaded_file(tmp_path):
    from damo_hybrid.cli import main

    (tmp_path / "a.libfm").write_text("\n".join(_lines(1100, seed=1)) + "\n")
    (tmp_path / "e.libfm").write_text("\n".join(_lines(300, seed=2)) + "\n")
    args = ["train", "--format", "libfm", "--data", str(tmp_path / "a.libfm"), "--eval-data", str(tmp_path / "e.libfm"),
            "--epochs", "2", "--batch-size", "256", "--dim", "4", "--quiet", "--threads", "1"]
    assert main([*args, "--stream", "--store", str(tmp_path / "s"), "--json", str(tmp_path / "s.json")]) == 0
    assert main([*args, "--store", str(tmp_path / "n"), "--json", str(tmp_path / "n.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "sn")
    assert a["steps"] == b["steps"] == 10
    assert (a["auc"], a["logloss"], a["train_logloss"]) == (b["auc"], b["logloss"], b["train_logloss"])
