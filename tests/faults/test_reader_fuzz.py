"""Fuzzing every input reader: random malformed lines, encodings, gzip and parquet truncation.

Whatever the bytes, a reader either returns a consistent dataset (bad lines skipped and
counted under ``on_error="skip"``) or raises ``ValueError`` naming the file (and the line,
where there is one). No other exception may escape."""

from __future__ import annotations

import dataclasses
import gzip
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damo_hybrid.data import FORMATS, OnError, Schema, read_dataset

CSV = Schema(("label", "x", "user", "item"), "label", dense=("x",), sparse=("user", "item"),
             int_sparse=("user",), sep=",", header=False)

# a valid line of each text format, and the separator its fields use
GOOD = {
    "criteo": ("1\t" + "\t".join(str(i) for i in range(13)) + "\t" + "\t".join(f"{i:08x}" for i in range(26)), "\t"),
    "avazu": ("1000,1,14102100,1005,0," + ",".join(f"s{i}" for i in range(19)), ","),
    "movielens": ("196\t242\t3\t881250949", "\t"),
    "csv": ("1,3.5,7,a", ","),
    "libfm": ("1 3:1 17:1 42:1", " "),
}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def _line(draw: st.DrawFn, fmt: str) -> bytes:
    """One line: valid, a valid one mangled (a field changed, dropped or duplicated), or noise."""
    good, sep = GOOD[fmt]
    kind = draw(st.sampled_from(["good", "field", "drop", "dup", "noise", "bytes"]))
    if kind == "good":
        return good.encode()
    parts = good.split(sep)
    i = draw(st.integers(0, len(parts) - 1))
    if kind == "field":
        parts[i] = draw(st.one_of(
            st.text(max_size=12),
            st.sampled_from(["", "nan", "inf", "-1", "2", "1e400", "99999999999999999999", "7.5", " ", ":", "\x00",
                             "\ufeff1", "é", "0x10", "+1", "1:2:3"]),
        ))
    elif kind == "drop":
        del parts[i]
    elif kind == "dup":
        parts.insert(i, parts[i])
    else:
        if kind == "noise":
            return draw(st.text(max_size=60)).replace("\n", " ").encode("utf-8", "surrogatepass")
        return draw(st.binary(max_size=60)).replace(b"\n", b" ")  # any bytes: bad UTF-8 included
    return sep.join(parts).replace("\n", " ").encode("utf-8", "surrogatepass")


def _check(path, fmt: str, schema: Schema | None, n_lines: int) -> None:
    for policy in (OnError.RAISE, OnError.SKIP):
        # libfm reads only the policy from a schema
        s = dataclasses.replace(schema or Schema(("label", "f"), "label", sparse=("f",)), on_error=policy)
        try:
            d = read_dataset(path, fmt, 4, s)
        except ValueError as e:
            assert str(path) in str(e), f"{type(e).__name__} does not name the file: {e}"
            assert re.search(rf"{re.escape(str(path))}(:\d+:| holds no |: )", str(e)), str(e)
            continue
        except Exception as e:  # pragma: no cover - the failure being looked for
            pytest.fail(f"{fmt} under {policy.value}: {type(e).__name__}: {e}")
        assert d.n >= 1 and d.n + d.skipped <= n_lines
        assert len(d.label) == d.n and set(np.unique(d.label)) <= {0.0, 1.0}
        assert all(len(k) == d.n and k.dtype == np.uint64 for k in d.sparse.values())
        assert d.dense.shape[0] == d.n and d.dense.dtype == np.float32 and np.isfinite(d.dense).all()
        if policy is OnError.RAISE:
            assert d.skipped == 0


@pytest.mark.parametrize("fmt", sorted(GOOD))
@SETTINGS
@given(data=st.data())
def test_malformed_text_files(tmp_path_factory, fmt, data):
    lines = data.draw(st.lists(_line(fmt), min_size=0, max_size=12), label="lines")
    bom = data.draw(st.booleans(), label="bom")
    crlf = data.draw(st.booleans(), label="crlf")
    body = (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines)
    gz = data.draw(st.booleans(), label="gzip")
    path = tmp_path_factory.mktemp("fuzz") / (f"d.{fmt}" + (".gz" if gz else ""))
    if gz:
        raw = gzip.compress(body)
        cut = data.draw(st.integers(0, len(raw)), label="gzip cut")
        path.write_bytes(raw[:cut])
    else:
        path.write_bytes(body)
    _check(path, fmt, CSV if fmt == "csv" else FORMATS[fmt], len(lines))


@SETTINGS
@given(cut=st.floats(0.0, 1.0), flip=st.integers(0, 10**6))
def test_truncated_or_corrupt_parquet(tmp_path_factory, cut, flip):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path_factory.mktemp("fuzz") / "d.parquet"
    n = 50
    pq.write_table(pa.table({"label": [i % 2 for i in range(n)], "x": [float(i) for i in range(n)],
                             "user": list(range(n)), "item": [f"i{i}" for i in range(n)]}), path)
    raw = bytearray(path.read_bytes())
    raw = raw[: max(0, int(len(raw) * cut))] if cut < 1.0 else raw
    if raw and flip % 3 == 0:
        raw[flip % len(raw)] ^= 0xFF
    path.write_bytes(bytes(raw))
    _check(path, "parquet", CSV, n)
