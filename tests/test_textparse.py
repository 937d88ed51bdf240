"""The compiled text fast path: the rows it accepts are the reference reader's rows, bit for bit,
and it hands on every line it cannot judge."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damo_hybrid.data.delimited import delimited_lines
from damo_hybrid.data.schema import FORMATS, DenseMode, Schema
from damo_hybrid.data.blocks import finish_block as _finish
from damo_hybrid.data.textparse import parse_text, plan_text
from damo_hybrid.keys.hashing import hash_feature

SCHEMA = Schema(columns=("y", "d0", "d1", "s0", "i0", "skip"), label="y", dense=("d0", "d1"), sparse=("s0", "i0"),
                int_sparse=("i0",), sep="\t", header=False, dense_mode=DenseMode.LOG1P)

NUMBERS = ["", "0", "1", "-0", "007", "1.5", "-2.25", "0.1", "123456789012345", "1234567890123456",
           "0.1234567890123456789012", "0.12345678901234567890123", ".5", "5.", "1e3", "nan", "inf", " 1", "1 ",
           "+1", "0x1f", "-", "1.2.3", "1_0", "\u00e9", "99999999999999.9"]
IDS = ["", "a", "68fd1e64", "x y", "\u00e9t\u00e9", "-5", "0", "\r", "12"]
INTS = ["0", "-1", "42", "-9223372036854775807", "123456789012345678", "1234567890123456789", "", "a", "+3", "1.0"]


def _reference(lines: list[str], schema: Schema) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Labels, raw dense values and keys as the reference reader's rules give them."""
    rows = [ln.rstrip("\r").split(schema.sep) for ln in lines if ln.strip()]
    col = {c: [r[i] for r in rows] for i, c in enumerate(schema.columns)}
    label = np.array([float(v) for v in col[schema.label]])
    dense = np.array([[float(v) if v else math.nan for v in col[c]] for c in schema.dense]).T.reshape(len(rows), -1)
    keys = {c: hash_feature(c, [int(v) for v in col[c]] if c in schema.int_sparse else col[c]) for c in schema.sparse}
    return label, dense, keys


def _check(lines: list[str], schema: Schema, must_accept: bool) -> None:
    body = "\n".join(lines).encode("utf-8")
    got = parse_text(body, plan_text(schema))
    if got is not None and _finish(schema, got.label, got.dense, dict(zip(schema.sparse, got.keys))) is None:
        got = None  # the stream's label rule hands it on
    ref_ok = True
    try:
        ref = delimited_lines("f", enumerate((ln.rstrip("\r") for ln in body.decode().split("\n")), 2), 16, schema,
                              allow_empty=True)
    except ValueError:
        ref_ok = False
    if must_accept:
        assert got is not None
    if got is None:
        return
    assert ref_ok, "the fast path accepted a block the reference reader refuses"
    label, dense, keys = _reference(lines, schema)
    np.testing.assert_array_equal(got.label, label)
    np.testing.assert_array_equal(got.dense, dense)
    for j, c in enumerate(schema.sparse):
        np.testing.assert_array_equal(got.keys[j], keys[c], err_msg=c)
        np.testing.assert_array_equal(got.keys[j], ref.sparse[c], err_msg=c)
    np.testing.assert_array_equal(got.label.astype(np.float32), ref.label)


def test_plain_values_negative_ids_crlf_and_blank_lines_are_taken_exactly():
    lines = ["1\t3\t\tab\t-7\tz", "0\t-0\t0.25\t\t0\t", "", "1\t007\t-12.5\t68fd1e64\t-922337203685477580\tq\r",
             "0\t123456789012345\t0.0000000000000000000001\tx y\t123456789012345678\t", "\r", "1\t\t\t\t5\t"]
    _check(lines, SCHEMA, must_accept=True)


def test_criteo_lines_are_taken():
    rng = np.random.default_rng(0)
    lines = ["\t".join([str(int(rng.integers(0, 2)))] + [str(int(rng.integers(-5, 9000))) for _ in range(13)]
                       + [f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]) for _ in range(10_000)]
    _check(lines, FORMATS["criteo"], must_accept=True)  # 10k lines: split over threads


@pytest.mark.parametrize("value", ["1e3", "nan", ".5", "5.", "+1", " 1", "1234567890123456", "\u00e9", "1_0"])
def test_a_value_it_cannot_judge_hands_the_block_on(value):
    assert parse_text(f"1\t{value}\t2\tab\t3\tz".encode(), plan_text(SCHEMA)) is None


def test_a_wrong_field_count_or_a_stray_cr_hands_the_block_on():
    plan = plan_text(SCHEMA)
    assert parse_text(b"1\t2\t3\tab\t4", plan) is None
    assert parse_text(b"1\t2\t3\tab\t4\tz\tmore", plan) is None
    assert parse_text(b"1\t2\t3\ta\rb\t4\tz", plan) is None
    assert parse_text(b"\t2\t3\tab\t4\tz", plan) is None  # empty label


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["0", "1", "2", "", "-1", "1.0"]), st.sampled_from(NUMBERS),
                          st.sampled_from(NUMBERS), st.sampled_from(IDS), st.sampled_from(INTS),
                          st.sampled_from(["", "z", "\u00e9", "a\tb"])), min_size=1, max_size=12),
       st.booleans())
def test_whatever_it_accepts_equals_the_reference(rows, crlf):
    lines = ["\t".join(r) + ("\r" if crlf else "") for r in rows]
    _check(lines, SCHEMA, must_accept=False)


def test_a_multibyte_or_missing_column_list_has_no_plan():
    assert plan_text(Schema(columns=("y", "a"), label="y", sparse=("a",), sep="::")) is None
    assert plan_text(Schema(columns=(), label="y", sparse=("a",))) is None


def test_a_stream_needs_no_pyarrow_for_text(monkeypatch, tmp_path):
    from damo_hybrid.data.readers import read_dataset
    from damo_hybrid.data.stream import DelimitedStream

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.csv", None)
    good = ["1\t3\t\tab\t-7\tz", "1\t4\t2\tab\t5\tz"] * 200
    lines = good + ["0\t1e3\t0.25\tcd\t0\t"] + good  # blocks of 4 KiB: fast ones, and one for the line reader
    p = tmp_path / "d.tsv"
    p.write_text("\n".join(lines) + "\n")
    stream = DelimitedStream(p, SCHEMA, batch_size=16, block_mb=0.0005)
    assert stream._convert is None
    ref = read_dataset(p, "csv", 16, SCHEMA)
    got = list(stream.batches())
    for f in SCHEMA.sparse:
        np.testing.assert_array_equal(np.concatenate([b.sparse[f] for b, _ in got]), ref.sparse[f])
    np.testing.assert_array_equal(np.concatenate([b.dense for b, _ in got]), ref.dense)
    np.testing.assert_array_equal(np.concatenate([b.label for b, _ in got]), ref.label)


def _parse_in_child(body: bytes, q) -> None:
    got = parse_text(body, plan_text(FORMATS["criteo"]))
    q.put(None if got is None else len(got.label))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_the_parse_threads_work_in_a_forked_child():
    import multiprocessing

    rng = np.random.default_rng(1)
    body = "\n".join("\t".join(["1"] + [str(int(v)) for v in rng.integers(0, 99, 13)] + ["ab"] * 26)
                     for _ in range(12_000)).encode()
    assert len(parse_text(body, plan_text(FORMATS["criteo"])).label) == 12_000  # the parent's pool now runs
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_parse_in_child, args=(body, q))
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "the child's parse waited for threads that only exist in the parent"
    assert q.get(timeout=5) == 12_000
