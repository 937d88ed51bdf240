"""Configurations that cannot fit are refused before anything is allocated (issue 28, class 9).

``train --batch-size 100000000`` ran into the kernel's OOM killer at 24 GB. Now each entry point
estimates what it needs (batch buffers, host caches with their per-table floors, benchmark
tables and files) against the memory (or disk) available and refuses with one line naming the
option to change, exit status 3. Where a test would allocate before the fix, the allocation is
replaced by a failure, so that no test can exhaust the machine.
"""

from __future__ import annotations

import numpy as np
import pytest
from _tmpfs import tmpfs

from damo_hybrid import EmbeddingStore, TableConfig
from damo_hybrid.cli import main
from damo_hybrid.errors import InsufficientMemoryError

GiB = 2**30


@pytest.fixture
def no_batches(monkeypatch):
    """Synthetic batches fail instead of being allocated (a refused configuration makes none)."""
    from damo_hybrid.data import synthetic

    def never(self, index):
        raise AssertionError("a batch was allocated")

    monkeypatch.setattr(synthetic.SyntheticCriteo, "batch", never)


@pytest.fixture
def one_gib(monkeypatch):
    import damo_hybrid.resources as r

    monkeypatch.setattr(r, "available_bytes", lambda: GiB)


def _refused(capsys, args, *named) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("damo-hybrid")]
    assert rc == 3, line
    assert len(line) < 300, line
    for n in named:
        assert n in line, line
    return line


# ------------------------------------------------------------------ the command line
def test_the_issues_batch_size_is_refused_before_any_allocation(capsys, no_batches):
    _refused(capsys, ["train", "--quiet", "--batch-size", "100000000"], "--batch-size", "available")


def test_a_batch_size_that_does_not_fit_the_memory_there_is(capsys, no_batches, one_gib):
    line = _refused(capsys, ["train", "--quiet", "--batch-size", "200000", "--cache-mb", "64"], "--batch-size")
    assert "fits" in line


def test_a_cache_budget_that_does_not_fit(capsys, no_batches, one_gib, tmp_path):
    _refused(capsys, ["train", "--quiet", "--cache-mb", "4096", "--store", str(tmp_path / "s")], "--cache-mb")


def test_a_demo_batch_that_does_not_fit(capsys, one_gib, monkeypatch):
    from damo_hybrid.data import synthetic

    monkeypatch.setattr(synthetic, "zipf_keys", lambda *a, **k: pytest.fail("a batch was allocated"))
    _refused(capsys, ["demo", "--batch-size", "10000000", "--fields", "26"], "--batch-size")


@pytest.mark.parametrize("args, named", [
    (["bench", "--rows", "100000000000"], "--rows"),
    (["bench", "--gpu", "--gpu-rows", "10000000000"], "--gpu-rows"),
    (["bench", "--loader", "--loader-rows", "100000000000"], "--loader-rows"),
])
def test_benchmarks_that_do_not_fit_are_refused(capsys, monkeypatch, args, named):
    import importlib

    for mod, name in [("damo_hybrid.bench.store", "run_store_bench"), ("damo_hybrid.bench.gpu", "run_gpu_bench"),
                      ("damo_hybrid.bench.loader", "run_loader_bench")]:
        monkeypatch.setattr(importlib.import_module(mod), name, lambda *a, **k: pytest.fail("the benchmark ran"))
    _refused(capsys, args, named)


def test_a_store_benchmark_larger_than_its_disk(tmp_path, capsys, monkeypatch):
    import damo_hybrid.bench.store as bs

    monkeypatch.setattr(bs, "run_store_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    with tmpfs(tmp_path / "small", "1m") as small:
        _refused(capsys, ["bench", "--rows", "100000", "--dims", "16", "--batches", "64", "--dir", str(small)],
                 "--rows", "disk")


def test_configurations_that_fit_are_not_refused():
    from damo_hybrid.cli import _parse
    from damo_hybrid.cli.bounds import check_memory

    for argv in (["train"], ["train", "--batch-size", "65536", "--cache-mb", "1024"], ["demo"]):
        check_memory(_parse(argv))


# ------------------------------------------------------------------ the Python entry points
def test_a_collection_whose_caches_cannot_fit_is_refused_and_caches_nothing(tmp_path):
    from damo_hybrid.nn.collection import EmbeddingCollection, Feature

    with EmbeddingStore(tmp_path / "s", [TableConfig("t", 16)]) as s:
        with pytest.raises(InsufficientMemoryError, match="cache_mb") as e:
            EmbeddingCollection(s, [Feature("f", "t")], cache_mb=10**8, backend="cpu")
        assert isinstance(e.value, MemoryError) and len(str(e.value)) < 300
        with pytest.raises(InsufficientMemoryError, match="min_cache_rows"):
            EmbeddingCollection(s, [Feature("f", "t")], cache_mb=1, min_cache_rows=10**11, backend="cpu")
        with pytest.raises(InsufficientMemoryError, match="fewer rows"):
            s.cache_table("t", rows=10**11)
        c = EmbeddingCollection(s, [Feature("f", "t")], cache_mb=4, backend="cpu")  # nothing was cached before
        assert c.caches["t"].capacity >= 1


def test_synthetic_data_whose_batch_cannot_fit_is_refused():
    from damo_hybrid.data.synthetic import SyntheticCriteo

    with pytest.raises(InsufficientMemoryError, match="batch_size"):
        SyntheticCriteo(10**10)
    assert SyntheticCriteo(64).batch(0).label.shape == (64,)


def test_available_memory_and_the_estimate():
    from damo_hybrid.resources import available_bytes, check_fits, step_bytes_per_sample

    avail = available_bytes()
    assert avail is None or 0 < avail < 2**50
    per = step_bytes_per_sample(26, 13, 16)
    assert 10_000 < per < 20_000  # 15.2 KB per sample measured for DeepFM (see the docstring)
    check_fits([("x", 10**15)], "lower x", available=None if avail is None else 10**16)  # fits: no error
    with pytest.raises(InsufficientMemoryError, match="lower x"):
        check_fits([("x", 2 * GiB)], "lower x", available=GiB)
    assert np.isfinite(per)
