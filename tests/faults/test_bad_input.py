"""Bad input files: each gives an error naming the file and line, or is skipped and counted
under ``on_error="skip"``; a store trained before the bad file is untouched."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from damo_hybrid.data import OnError, Schema, read_dataset

SCHEMA = Schema(("label", "x", "user", "item"), "label", dense=("x",), sparse=("user", "item"),
                int_sparse=("user",), sep=",", header=False)
GOOD = "1,3.5,7,a\n0,,8,b\n"


def _write(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("line, why", [
    ("1,2,3\n", r"d.csv:3: 3 columns, expected 4"),
    ("yes,1,2,c\n", r"d.csv:3: label 'yes' is not a number"),
    ("2,1,2,c\n", r"d.csv:3: label '2' is not 0 or 1"),
    ("1,abc,2,c\n", r"d.csv:3: x value 'abc' is not a number"),
    ("1,1,99999999999999999999,c\n", r"d.csv:3: user value '99999999999999999999' is not an int64 id"),
    ("1,1,7.5,c\n", r"d.csv:3: user value '7.5' is not an int64 id"),
])
def test_bad_line_raises_naming_file_and_line_or_is_skipped(tmp_path, line, why):
    p = _write(tmp_path, GOOD + line + GOOD)
    with pytest.raises(ValueError, match=why):
        read_dataset(p, "csv", 4, SCHEMA)
    d = read_dataset(p, "csv", 4, Schema(**{**SCHEMA.__dict__, "on_error": OnError.SKIP}))
    assert d.skipped == 1 and d.n == 4
    np.testing.assert_array_equal(d.label, [1, 0, 1, 0])
    clean = read_dataset(_write(tmp_path, GOOD + GOOD, "clean.csv"), "csv", 4, SCHEMA)
    for f in clean.sparse:  # the good rows parse exactly as in a clean file
        np.testing.assert_array_equal(d.sparse[f], clean.sparse[f])


@pytest.mark.parametrize("fmt, name", [("csv", "d.csv"), ("libfm", "d.libfm"), ("criteo", "d.tsv")])
def test_empty_file_is_an_error(tmp_path, fmt, name):
    p = _write(tmp_path, "", name)
    with pytest.raises(ValueError, match="holds no rows"):
        read_dataset(p, fmt, 4, SCHEMA if fmt == "csv" else None)


def test_truncated_gzip_names_file_and_line(tmp_path):
    p = tmp_path / "d.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write(GOOD * 5000)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"d.csv.gz:\d+: unreadable after \d+ lines"):
        read_dataset(p, "csv", 4, SCHEMA)
    # even under skip: a truncated file is never silently shortened
    with pytest.raises(ValueError, match="unreadable"):
        read_dataset(p, "csv", 4, Schema(**{**SCHEMA.__dict__, "on_error": "skip"}))


def test_libfm_bad_lines(tmp_path):
    p = _write(tmp_path, "1 3:1 10:1\n-1 4:1 11:1\nx 5:1 12:1\n", "d.libfm")
    with pytest.raises(ValueError, match=r"d.libfm:3: label 'x' is not a number"):
        read_dataset(p, "libfm", 2)
    p.write_text("1 3:1 10:1\n-1 4:1\n")
    with pytest.raises(ValueError, match=r"d.libfm:2: 1 features, expected 2"):
        read_dataset(p, "libfm", 2)


def test_libfm_skip_policy_counts_both_kinds(tmp_path):
    from damo_hybrid.data.libfm import libfm_schema
    from damo_hybrid.data.readers import read_dataset
    p = _write(tmp_path, "1 3:1 10:1\n-1 4:1 11:1\nx 5:1 12:1\n1 6:1\n", "d.libfm")
    d = read_dataset(p, "libfm", 2, libfm_schema(2, OnError.SKIP))
    assert d.skipped == 2 and d.n == 2
    np.testing.assert_array_equal(d.label, [1, 0])
    assert d.sparse_fields == ["f0", "f1"]


def test_bad_file_loses_nothing_already_stored(tmp_path, snapshot):
    """A training run over a bad file fails before touching the store."""
    from damo_hybrid.cli import main

    store = tmp_path / "s"
    good = _write(tmp_path, "".join(f"{i % 2},{i},{i % 50},{chr(97 + i % 5)}\n" for i in range(400)), "good.csv")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nformat = "csv"\nbatch-size = 64\ndim = 4\ncache-mb = 4\nquiet = true\n'
                   '[schema]\ncolumns = ["label", "x", "user", "item"]\nlabel = "label"\ndense = ["x"]\n'
                   'sparse = ["user", "item"]\nint_sparse = ["user"]\nheader = false\n')
    assert main(["train", "--config", str(cfg), "--data", str(good), "--steps", "5", "--store", str(store)]) == 0
    before = snapshot(store)
    assert all(len(v[0]) > 0 for v in before.values())
    bad = _write(tmp_path, GOOD + "1,1,2\n", "bad.csv")
    assert main(["train", "--config", str(cfg), "--data", str(bad), "--steps", "5", "--store", str(store)]) == 2
    snapshot.same(before, snapshot(store))
