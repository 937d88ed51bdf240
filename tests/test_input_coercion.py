"""Issue 28, class 3: no value from a file or a config is silently coerced.

Config values ([train], [store], [schema], [fields.NAME]) pass the command line's checks and
must have the TOML type of the option (booleans only booleans, numbers only numbers, strings only
strings); data values (parquet, CSV, libFM) are checked for type and range, and an integer id that
is not an integer is refused with one line naming the file, the column and the row.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from damo_hybrid.cli import main
from damo_hybrid.data.readers import read_dataset
from damo_hybrid.data.schema import Schema

SCHEMA_TOML = '[schema]\ncolumns = ["l", "a"]\nlabel = "l"\nsparse = ["a"]\n'

CONFIG_BAD: list[tuple[str, str]] = [
    # [train]: booleans only booleans
    ('[train]\nresume = "no"\n', r"\[train\] resume = 'no': must be true or false"),
    ('[train]\nallow-config-change = "false"\n', r"\[train\] allow-config-change = 'false': must be true or false"),
    ("[train]\nstream = 1\n", r"\[train\] stream = 1: must be true or false"),
    ('[train]\nquiet = "yes"\n', r"\[train\] quiet = 'yes': must be true or false"),
    ("[train]\nno-prefetch = 0\n", r"\[train\] no-prefetch = 0: must be true or false"),
    # [train]: numbers only numbers, in range
    ('[train]\nlr = "0.1"\n', r"\[train\] lr = '0.1': must be a number"),
    ("[train]\nlr = true\n", r"\[train\] lr = True: must be a number"),
    ('[train]\nsteps = "2"\n', r"\[train\] steps = '2': must be an integer"),
    ("[train]\nsteps = 2.0\n", r"\[train\] steps = 2.0: must be an integer"),
    ("[train]\nsteps = true\n", r"\[train\] steps = True: must be an integer"),
    ("[train]\nbatch-size = 0\n", r"\[train\] batch-size = 0: must be >= 1"),
    ("[train]\nlr = -1\n", r"\[train\] lr = -1: must lie in"),
    ("[train]\neval-fraction = nan\n", r"\[train\] eval-fraction = nan: must lie in"),
    # [train]: strings only strings
    ("[train]\ndata = 5\n", r"\[train\] data = 5: must be a string"),
    ("[train]\nmodel = 1\n", r"\[train\] model = 1: must be a string"),
    ("[train]\nstore = true\n", r"\[train\] store = True: must be a string"),
    ("[train]\ntable-compression = 5\n", r"\[train\] table-compression = 5: must be a string"),
    ('[train]\ntable-compression = "qr:rows=x"\n', r"\[train\] table-compression = 'qr:rows=x': rows must be an integer"),
    ('[train]\nmodel = "xgboost"\n', r"\[train\] model = 'xgboost' is not one of"),
    # [store]: StoreConfig's types, checked before anything runs
    ('[store]\nsync_writes = "false"\n', r"\[store\] sync_writes must be a bool, got 'false'"),
    ("[store]\nmmap_reads = 0\n", r"\[store\] mmap_reads must be a bool, got 0"),
    ("[store]\nttl_seconds = true\n", r"\[store\] ttl_seconds must be None or an int >= 1, got True"),
    ('[store]\ncache_mb = "64"\n', r"\[store\] cache_mb must be a finite number, got '64'"),
    ("[store]\nblock_cache_mb = 1.5\n", r"\[store\] block_cache_mb must be an int >= 1, got 1.5"),
    ("[store]\nread_threads = false\n", r"\[store\] read_threads must be an int >= 0, got False"),
    ("store = 5\n", r"\[store\] must be a table"),
    # [schema]
    (SCHEMA_TOML + 'header = "no"\n', r"\[schema\] header must be true, false or absent, got 'no'"),
    ('[schema]\ncolumns = ["l", "a"]\nlabel = 5\nsparse = ["a"]\n', r"\[schema\] label must be a column name"),
    (SCHEMA_TOML + 'label_threshold = "4"\n', r"\[schema\] label_threshold must be a finite number or absent"),
    (SCHEMA_TOML + "label_threshold = true\n", r"\[schema\] label_threshold must be a finite number or absent"),
    (SCHEMA_TOML + "sep = 5\n", r"\[schema\] sep must be a non-empty delimiter string without a newline, got 5"),
    (SCHEMA_TOML + 'dense_mode = "squares"\n', r"\[schema\] dense_mode must be one of"),
    (SCHEMA_TOML + "on_error = false\n", r"\[schema\] on_error must be one of"),
    # [fields.NAME]
    ("[fields.C1]\nrow-dtype = 16\n", r"\[fields.C1\] row-dtype = 16: must be a string"),
    ('[fields.C1]\nrow-dtype = "fp8"\n', r"\[fields.C1\]: row_dtype must be one of"),
    ("[fields.C1]\ntable-compression = 5\n", r"\[fields.C1\] table-compression = 5: must be a string"),
    ("[fields]\nC1 = 3\n", r"\[fields.C1\] must be a table"),
]


@pytest.mark.parametrize("text, why", CONFIG_BAD, ids=[t.replace("\n", " ") for t, _ in CONFIG_BAD])
def test_a_config_value_of_the_wrong_type_or_range_is_one_line_before_any_work(tmp_path, capsys, text, why):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    store = tmp_path / "s"
    assert main(["train", "--quiet", "--config", str(cfg), "--steps", "2", "--batch-size", "64",
                 "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(why, err[0]), err[0]
    assert "run.toml" in err[0] and len(err[0]) < 300, err[0]
    assert not store.exists()


def test_a_config_of_the_right_types_still_applies(tmp_path, capsys):
    from damo_hybrid.cli import _parse

    cfg = tmp_path / "run.toml"
    cfg.write_text('[train]\nlr = 1\nsteps = 3\nresume = false\nquiet = true\nmodel = "dcn"\n'
                   'table-compression = "hashing:rows=1000"\n[store]\nsync_writes = true\ncache_mb = 64\n'
                   '[fields.C1]\nrow-dtype = "float16"\n')
    a = _parse(["train", "--config", str(cfg), "--steps", "5"])
    assert (a.lr, a.steps, a.resume, a.quiet, a.model) == (1.0, 5, False, True, "dcn")
    assert isinstance(a.lr, float) and a.table_compression.rows == 1000


# ---------------------------------------------------------------- config dataclasses
@pytest.mark.parametrize("make", [
    lambda: __import__("damo_hybrid").StoreConfig(ttl_seconds=True),
    lambda: __import__("damo_hybrid.config").config.ScheduleConfig(staircase="no"),
    lambda: __import__("damo_hybrid.config").config.ScheduleConfig(warmup_steps=True),
    lambda: __import__("damo_hybrid.config").config.InitializerConfig(seed=True),
    lambda: __import__("damo_hybrid.config").config.AdmissionConfig(min_count=True),
    lambda: __import__("damo_hybrid.config").config.AdmissionConfig(capacity=True),
    lambda: __import__("damo_hybrid.config").config.ExpiryConfig(min_count=True),
    lambda: __import__("damo_hybrid.config").config.TableConfig("t", 4, row_dtype=["float32"]),
    lambda: __import__("damo_hybrid.config").config.TableConfig.from_dict(
        {"name": "t", "dim": 4, "optimizer": {"kind": "sgd", "lr": 0.1, "schedule": {"staircase": "false"}}}),
], ids=["ttl-bool", "staircase-str", "warmup-bool", "seed-bool", "min_count-bool", "capacity-bool",
        "expiry-min_count-bool", "row_dtype-list", "from_dict-staircase"])
def test_config_dataclasses_refuse_values_of_the_wrong_type(make):
    with pytest.raises((TypeError, ValueError), match=r"must be") as ei:
        make()
    assert "unhashable" not in str(ei.value)


def test_compression_spec_must_be_text():
    from damo_hybrid.keys.compression import CompressionConfig

    with pytest.raises(TypeError, match="compression spec must be a string"):
        CompressionConfig.parse(5)  # type: ignore[arg-type]


def test_schema_refuses_values_of_the_wrong_type():
    with pytest.raises((TypeError, ValueError), match="header must be true, false or absent"):
        Schema(("l", "a"), "l", sparse=("a",), header="no")  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="label must be a column name"):
        Schema(("l", "a"), 0, sparse=("a",))  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="label_threshold must be a finite number"):
        Schema(("l", "a"), "l", sparse=("a",), label_threshold=True)


# ---------------------------------------------------------------- hashing
@pytest.mark.parametrize("values", [[7, 7.5], [7, True], [b"a", 5], [7, "8"], [7, None]],
                         ids=["int-float", "int-bool", "bytes-int", "int-str", "int-none"])
def test_hash_feature_refuses_mixed_values_instead_of_converting_them(values):
    from damo_hybrid.keys.hashing import hash_feature

    with pytest.raises(TypeError):
        hash_feature("f", values)


def test_hash_feature_keeps_ints_of_every_width():
    from damo_hybrid.keys.hashing import hash_feature

    a = hash_feature("f", [1, -1, 2**64 - 1, np.int32(5)])
    assert a[1] == a[2] and a[3] == hash_feature("f", [5])[0]


# ---------------------------------------------------------------- parquet
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
PQ = Schema((), "label", ("x",), ("user",), int_sparse=("user",))


def _pq(path, **cols):
    pq.write_table(pa.table(cols), path)
    return path


def _both(path, schema=PQ, batch=8):
    """The loaded reader's and the stream's result (or error text) for one file."""
    from damo_hybrid.data.parquet_stream import ParquetStream

    out = []
    for read in (lambda: read_dataset(path, "parquet", batch, schema).sparse["user"],
                 lambda: np.concatenate([b.sparse["user"] for b, _ in ParquetStream(path, schema, batch).batches()])):
        try:
            out.append(read())
        except ValueError as e:
            out.append(str(e))
    return out


def test_a_fractional_id_in_a_parquet_int_column_is_refused_naming_file_column_and_row(tmp_path):
    p = _pq(tmp_path / "f.parquet", label=[1, 0, 1], x=[1.0, 2.0, 3.0], user=[7.0, 7.5, 8.0])
    for got in _both(p):
        assert isinstance(got, str) and re.search(r"f\.parquet:2: user value 7\.5 is not an int64 id", got), got


@pytest.mark.parametrize("user", [[7.0, 8.0, float("nan")], [True, False, True], [7.0, 2.0**63, 1.0]],
                         ids=["nan", "bool", "out-of-range"])
def test_other_non_ids_in_a_parquet_int_column_are_refused(tmp_path, user):
    p = _pq(tmp_path / "f.parquet", label=[1, 0, 1], x=[1.0, 2.0, 3.0], user=user)
    for got in _both(p):
        assert isinstance(got, str) and "is not an int64 id" in got and "f.parquet:" in got, got


def test_integral_floats_in_a_parquet_int_column_are_the_ids_they_equal(tmp_path):
    from damo_hybrid.keys.hashing import hash_feature

    p = _pq(tmp_path / "f.parquet", label=[1, 0], x=[1.0, 2.0], user=[7.0, -8.0])
    for got in _both(p):
        np.testing.assert_array_equal(got, hash_feature("user", np.array([7, -8])))


def test_uint64_ids_stream_as_they_load(tmp_path):
    p = _pq(tmp_path / "u.parquet", label=[1, 0], x=[1.0, 2.0], user=pa.array([2**64 - 1, 8], pa.uint64()))
    a, b = _both(p)
    assert not isinstance(b, str), b
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cols, why", [
    (dict(label=[1, 0], x=["1.5", "2"], user=[7, 8]), r"column 'x' holds string values; a dense column must hold numbers"),
    (dict(label=[1, 0], x=[True, False], user=[7, 8]), r"column 'x' holds bool values; a dense column must hold numbers"),
    (dict(label=["1", "0"], x=[1.0, 2.0], user=[7, 8]), r"column 'label' holds string values; the label column must hold"),
    (dict(label=[1, 0], x=[float("inf"), 2.0], user=[7, 8]), r"p\.parquet:1: x value inf is not a number"),
], ids=["dense-str", "dense-bool", "label-str", "dense-inf"])
def test_parquet_label_and_dense_columns_must_hold_finite_numbers(tmp_path, cols, why):
    p = _pq(tmp_path / "p.parquet", **cols)
    for got in _both(p):
        assert isinstance(got, str) and re.search(why, got), got


def test_a_boolean_parquet_label_is_a_click_flag(tmp_path):
    p = _pq(tmp_path / "b.parquet", label=[True, False], x=[1.0, 2.0], user=[7, 8])
    np.testing.assert_array_equal(read_dataset(p, "parquet", 8, PQ).label, [1.0, 0.0])


def test_cli_refuses_a_fractional_parquet_id_before_the_store(tmp_path, capsys):
    p = _pq(tmp_path / "f.parquet", label=[1, 0, 1], x=[1.0, 2.0, 3.0], user=[7.0, 7.5, 8.0])
    cfg = tmp_path / "run.toml"
    cfg.write_text('[schema]\ncolumns = []\nlabel = "label"\ndense = ["x"]\nsparse = ["user"]\nint_sparse = ["user"]\n')
    for extra in ([], ["--stream"]):
        assert main(["train", "--quiet", "--config", str(cfg), "--format", "parquet", "--data", str(p), "--steps", "2",
                     "--store", str(tmp_path / "s"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(r"f\.parquet:2: user value 7\.5 is not an int64 id", err[0]), err
        assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- CSV and libFM
CSV = Schema(("label", "x", "user"), "label", ("x",), ("user",), int_sparse=("user",), header=False)


@pytest.mark.parametrize("line, why", [
    ("1,inf,7\n", r"d\.csv:2: x value 'inf' is not a number"),
    ("1,-Infinity,7\n", r"d\.csv:2: x value '-Infinity' is not a number"),
], ids=["inf", "-Infinity"])
def test_a_non_finite_dense_value_is_refused_by_every_reader(tmp_path, line, why):
    from damo_hybrid.data.stream import DelimitedStream

    p = tmp_path / "d.csv"
    p.write_text("0,1,5\n" + line + "0,2,6\n")
    with pytest.raises(ValueError, match=why):
        read_dataset(p, "csv", 8, CSV)
    for compiled in (True, False):
        with pytest.raises(ValueError, match=why):
            list(DelimitedStream(p, CSV, 8, compiled=compiled).batches())


def test_an_infinite_label_is_refused_under_a_threshold(tmp_path):
    s = Schema(("label", "x", "user"), "label", ("x",), ("user",), header=False, label_threshold=4.0)
    p = tmp_path / "d.csv"
    p.write_text("5,1,5\ninf,1,7\n")
    with pytest.raises(ValueError, match=r"d\.csv:2: label 'inf' is not a number"):
        read_dataset(p, "csv", 8, s)


@pytest.mark.parametrize("label", ["nan", "inf"])
def test_a_libfm_stream_refuses_the_labels_its_line_reader_refuses(tmp_path, label):
    from damo_hybrid.data.libfm import LibfmStream

    p = tmp_path / "d.libfm"
    p.write_text(f"1 3:1 10:1\n{label} 4:1 11:1\n-1 5:1 12:1\n")
    with pytest.raises(ValueError, match=rf"d\.libfm:2: label '{label}' is not a number"):
        read_dataset(p, "libfm", 2)
    with pytest.raises(ValueError, match=rf"d\.libfm:2: label '{label}' is not a number"):
        list(LibfmStream(p, 2).batches())
