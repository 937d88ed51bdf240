"""Readers for each --format, dense bucketizing, --config TOML and --eval-fraction."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from damo_hybrid.cli import main
from damo_hybrid.data.readers import read_dataset
from damo_hybrid.data.schema import DenseMode, Schema
from damo_hybrid.data.tabular import _buckets
from damo_hybrid.keys.hashing import hash_feature


def test_avazu_header_is_detected_and_ids_hash_per_field(tmp_path):
    from damo_hybrid.data import FORMATS

    cols = FORMATS["avazu"].columns
    row = ["123", "1", "14102100"] + [f"v{i}" for i in range(len(cols) - 3)]
    p = tmp_path / "a.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write(",".join(cols) + "\n" + ",".join(row) + "\n")
    no_header = tmp_path / "b.csv"
    no_header.write_text(",".join(row) + "\n")
    a, b = read_dataset(p, "avazu", 8), read_dataset(no_header, "avazu", 8)
    assert a.n == b.n == 1 and "id" not in a.sparse and a.dense.shape == (1, 0)
    assert a.sparse["site_id"][0] == hash_feature("site_id", ["v2"])[0]
    for f in a.sparse:
        np.testing.assert_array_equal(a.sparse[f], b.sparse[f])


def test_movielens_ratings_become_clicks(tmp_path):
    p = tmp_path / "u.data"
    p.write_text("1\t10\t5\t881250949\n2\t10\t3\t881250950\n3\t11\t4\t881250951\n")
    d = read_dataset(p, "movielens", 8)
    np.testing.assert_array_equal(d.label, [1, 0, 1])
    np.testing.assert_array_equal(d.sparse["user_id"], hash_feature("user_id", [1, 2, 3]))  # int ids


def test_libfm_fields_are_positions(tmp_path):
    p = tmp_path / "f.libfm"
    p.write_text("-1 3:1 10:1\n1 4:1 10:1\n")
    d = read_dataset(p, "libfm", 8)
    np.testing.assert_array_equal(d.label, [0, 1])
    np.testing.assert_array_equal(d.sparse["f0"], hash_feature("f0", [3, 4]))
    assert d.sparse["f1"][0] == d.sparse["f1"][1]


def test_buckets_follow_the_log_square_rule():
    x = np.array([np.nan, -1.0, 0.0, 2.0, 3.0, 100.0])
    b = _buckets(x)
    assert b[0] == np.iinfo(np.int64).min
    np.testing.assert_array_equal(b[1:], [-1, 0, 2, int(np.log(3.0) ** 2), int(np.log(100.0) ** 2)])


@pytest.mark.parametrize("mode, n_dense, n_sparse", [("log1p", 1, 1), ("bucketize", 0, 2), ("both", 1, 2)])
def test_dense_modes(tmp_path, mode, n_dense, n_sparse):
    p = tmp_path / "d.csv"
    p.write_text("label,x,c\n1,5,a\n0,,b\n")
    d = read_dataset(p, "csv", 8, Schema(("label", "x", "c"), "label", ("x",), ("c",), dense_mode=mode))
    assert d.dense.shape == (2, n_dense) and len(d.sparse_fields) == n_sparse
    if DenseMode(mode) is not DenseMode.LOG1P:
        assert d.sparse["x"][0] == hash_feature("x", [int(np.log(5.0) ** 2)])[0]


def test_parquet_matches_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    schema = Schema(("label", "x", "user", "item"), "label", ("x",), ("user", "item"), int_sparse=("user",))
    csv = tmp_path / "d.csv"
    csv.write_text("1,3.5,7,a\n0,,8,b\n1,2,9,\n")
    pq.write_table(pa.table({"label": [1, 0, 1], "x": [3.5, None, 2.0], "user": [7, 8, 9], "item": ["a", "b", None],
                             "ignored": [0, 0, 0]}), tmp_path / "d.parquet")
    a = read_dataset(csv, "csv", 8, schema)
    b = read_dataset(tmp_path / "d.parquet", "parquet", 8, Schema((), "label", ("x",), ("user", "item")))
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.dense, b.dense)
    for f in a.sparse:
        np.testing.assert_array_equal(a.sparse[f], b.sparse[f])


def test_schema_validation():
    with pytest.raises(ValueError, match="not among the schema's columns"):
        Schema(("a", "b"), "a", sparse=("c",))
    with pytest.raises(ValueError, match="subset of sparse"):
        Schema(("a", "b"), "a", sparse=("b",), int_sparse=("a",))
    with pytest.raises(ValueError, match="unknown schema keys"):
        Schema.from_dict({"columns": ["a", "b"], "label": "a", "sparse": ["b"], "colour": 1})
    with pytest.raises(ValueError, match="needs a schema"):
        read_dataset(__file__, "csv")


def _config(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_config_file_sets_options_and_command_line_wins(tmp_path):
    data = tmp_path / "d.csv"
    rng = np.random.default_rng(0)
    data.write_text("".join(f"{int(u % 3 == 0)},{u},{rng.integers(9)}\n" for u in rng.integers(0, 40, 600)))
    cfg = _config(tmp_path, '[train]\nformat = "csv"\nbatch-size = 50\ndim = 4\ncache-mb = 4\nsteps = 3\n'
                            'eval-fraction = 0.2\nquiet = true\n'
                            '[schema]\ncolumns = ["label", "user", "item"]\nlabel = "label"\n'
                            'sparse = ["user", "item"]\nint_sparse = ["user", "item"]\n')
    out = tmp_path / "s.json"
    assert main(["train", "--config", cfg, "--data", str(data), "--steps", "7", "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["steps"] == 7 and s["auc"] is not None  # --steps beat the file; eval split from --eval-fraction


@pytest.mark.parametrize("text, why", [
    ("[train]\ncolour = 1\n", "unknown \\[train\\] keys \\['colour'\\]"),
    ("[train]\nmodel = \"gpt\"\n", "model = 'gpt' is not one of"),
    ("[trian]\n", "unknown sections"),
    ("[train\n", "not valid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path, capsys, text, why):
    import re

    assert main(["train", "--config", _config(tmp_path, text)]) == 2
    assert re.search(why, capsys.readouterr().err)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_a_utf8_bom_is_not_data(tmp_path, gz):
    from damo_hybrid.data.schema import _avazu_schema

    cols = _avazu_schema().columns
    rows = [",".join(cols)] + [",".join(["1", str(i % 2), "14102100"] + ["a"] * (len(cols) - 3)) for i in range(4)]
    raw = ("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8")
    p = tmp_path / ("a.csv.gz" if gz else "a.csv")
    p.write_bytes(gzip.compress(raw) if gz else raw)
    d = read_dataset(p, "avazu", 2)
    assert d.n == 4  # the header was recognised despite the BOM
    np.testing.assert_array_equal(d.label, [0, 1, 0, 1])
    crit = tmp_path / "c.tsv"
    crit.write_bytes(("\ufeff1" + "\t1" * 13 + "\ta" * 26 + "\n").encode("utf-8"))
    assert read_dataset(crit, "criteo", 1).label.tolist() == [1.0]  # the first label was "\ufeff1"
