"""``damo-hybrid bench`` says with its exit status whether it did what it was asked (issue 28, class 10).

Every argument of every benchmark is checked before any work (exit 2, one line naming the
option); a benchmark whose check fails exits 1 with a line saying which. The benchmarks
themselves are replaced by stand-ins here, except a tiny store run and a tiny loader run.
"""

from __future__ import annotations

import re

import pytest

from damo_hybrid.cli import main

RUNNERS = [("damo_hybrid.bench.train", "run_train_bench"), ("damo_hybrid.bench.quality", "run_quality"),
           ("damo_hybrid.bench.compression", "run_compression_study"), ("damo_hybrid.bench.gpu", "run_gpu_bench"),
           ("damo_hybrid.bench.host", "run_host_bench"), ("damo_hybrid.bench.loader", "run_loader_bench"),
           ("damo_hybrid.bench.loader", "write_criteo_file"), ("damo_hybrid.bench.store", "run_store_bench"),
           ("damo_hybrid.bench.dist", "run_dist_bench")]


@pytest.fixture
def no_bench_runs(monkeypatch):
    """Every benchmark replaced by one that fails the test if it runs."""
    import importlib

    def never(*a, **k):
        raise AssertionError("a benchmark ran although its arguments are bad")

    for mod, name in RUNNERS:
        monkeypatch.setattr(importlib.import_module(mod), name, never)


B = ["bench"]
BAD = [
    (B + ["--train", "--fractions", "-1"], r"--fractions: each must lie in \(0, 1\], got -1"),
    (B + ["--train", "--fractions", "0"], r"--fractions: each must lie in \(0, 1\], got 0"),
    (B + ["--train", "--fractions", "1.5"], r"--fractions: each must lie in \(0, 1\]"),
    (B + ["--train", "--fractions", "nan"], r"--fractions: each must lie in \(0, 1\]"),
    (B + ["--train", "--fractions", "quarter"], r"--fractions: 'quarter' is not a number"),
    (B + ["--train", "--fractions", ""], r"--fractions: give at least one"),
    (B + ["--train", "--storages", "s3"], r"--storages"),
    (B + ["--train", "--data-format", "xml"], r"--data-format"),
    (B + ["--train", "--data", "{tmp}/missing.tsv"], r"--data .*missing\.tsv"),
    (B + ["--train", "--worker-threads", "0"], r"--worker-threads: must be >= 1"),
    (B + ["--dims", "0"], r"--dims: each must be in \[1, 65535\], got 0"),
    (B + ["--dims", "sixteen"], r"--dims: 'sixteen' is not an integer"),
    (B + ["--batches", "0"], r"--batches: each must be >= 1, got 0"),
    (B + ["--rows", "100", "--batches", "4096"], r"--batches 4096 exceeds --rows 100"),
    (B + ["--dir", "{tmp}/nowhere"], r"--dir .*nowhere"),
    (B + ["--host", "--host-threads", "0"], r"--host-threads: each must be >= 1, got 0"),
    (B + ["--host", "--host-threads", "1,x"], r"--host-threads: 'x' is not an integer"),
    (B + ["--gpu", "--gpu-rows", "0"], r"--gpu-rows: must be >= 1"),
    (B + ["--gpu", "--gpu-steps", "0"], r"--gpu-steps: must be >= 1"),
    (B + ["--gpu", "--gpu-batches", "0"], r"--gpu-batches: each must be >= 1"),
    (B + ["--gpu", "--device-fraction", "2"], r"--device-fraction: must lie in"),
    (B + ["--gpu", "--host-fraction", "0"], r"--host-fraction: must lie in"),
    (B + ["--gpu", "--sides", "tpu"], r"--sides: unknown \['tpu'\]"),
    (B + ["--gpu", "--models", "xgboost"], r"--models: unknown \['xgboost'\]"),
    (B + ["--compression", "--ratios", "0.5"], r"--ratios: each must lie in \[1"),
    (B + ["--compression", "--methods", "zip"], r"--methods: unknown \['zip'\]"),
    (B + ["--compression", "--datasets", "synthetic", "--seeds", "-1"], r"--seeds: each must be >= 0, got -1"),
    (B + ["--quality", "--datasets", "imagenet"], r"--datasets: unknown \['imagenet'\]"),
    (B + ["--quality", "--data-root", "{tmp}/none"], r"--data-root .*none"),
    (B + ["--loader", "--loader-rows", "0"], r"--loader-rows: must be >= 1"),
    (B + ["--train", "--host"], r"one benchmark at a time.*--train.*--host"),
    (B + ["--loader", "--write-criteo", "{tmp}/x.tsv"], r"one benchmark at a time"),
    (B + ["--fractions", "0.5"], r"--fractions applies to bench --train"),
    (B + ["--train", "--dir", "{tmp}"], r"--dir applies to"),
    (B + ["--host", "--rows", "5"], r"--rows applies to"),
    (B + ["--write-criteo", "{tmp}/x.tsv", "--json", "{tmp}/x.json"], r"--json applies to"),
    (B + ["--dist", "--world", "1"], r"--world: must be >= 2"),
]


@pytest.mark.parametrize("args, why", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_bad_bench_arguments_are_refused_before_any_work(tmp_path, capsys, no_bench_runs, args, why):
    rc = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("damo-hybrid"), err
    assert re.search(why, err[0]), err[0]


def _train_result(error: bool) -> dict:
    run = {"fraction": 0.05, "cache_mb": 10.0, "row_dtype": "float32", "storage": "rocksdb"}
    run.update({"error": "host cache of table 'emb' cannot free 9 slots"} if error else
               {"samples_per_s": 1.0, "ratio_to_torch": 0.5})
    return {"torch": {"samples_per_s": 2.0}, "damo": [dict(run, fraction=0.25, samples_per_s=1.0), run]}


@pytest.mark.parametrize("error, status", [(True, 1), (False, 0)])
def test_a_train_benchmark_with_a_failed_run_exits_1(monkeypatch, tmp_path, capsys, error, status):
    import damo_hybrid.bench.train as bt

    monkeypatch.setattr(bt, "run_train_bench", lambda **k: _train_result(error))
    assert main(["bench", "--train", "--json", str(tmp_path / "r.json")]) == status
    err = capsys.readouterr().err
    assert (tmp_path / "r.json").exists()  # the report is written either way
    if error:
        (line,) = err.strip().splitlines()
        assert line.startswith("damo-hybrid bench: check failed:") and "cannot free" in line and len(line) < 300


def test_a_quality_benchmark_outside_its_budget_exits_1(monkeypatch, capsys, tmp_path):
    import damo_hybrid.bench.quality as bq

    res = {"datasets": {"criteo": {"train_rows": 1, "eval_rows": 1, "epochs": 1, "auc_gap": -0.01, "within_0.005": False,
                                   "mean": {"damo": {"auc": 0.7, "logloss": 0.5}, "in_memory": {"auc": 0.71, "logloss": 0.5}}}}}
    monkeypatch.setattr(bq, "run_quality", lambda *a, **k: res)
    assert main(["bench", "--quality", "--datasets", "criteo", "--data-root", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("damo-hybrid bench: check failed:") and "criteo" in line


def test_a_loader_that_reads_fewer_rows_than_written_exits_1(monkeypatch, capsys, tmp_path):
    import damo_hybrid.bench.loader as bl

    write = bl.write_criteo_file
    monkeypatch.setattr(bl, "write_criteo_file", lambda path, rows, *a, **k: write(path, rows - 1, *a, **k))
    assert main(["bench", "--loader", "--loader-rows", "500", "--loader-repeats", "1", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("damo-hybrid bench: check failed:") and "499" in line and "500" in line


def test_a_host_manager_thread_failing_reports_its_own_error(monkeypatch, capsys):
    import damo_hybrid.bench.host as bh

    def boom(*a, **k):
        raise ValueError("zipf stream broke")

    monkeypatch.setattr(bh, "zipf_keys", boom)
    rc = main(["bench", "--host", "--host-threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "zipf stream broke" in err.strip().splitlines()[-1], err
    assert "see the log" not in err


def test_a_tiny_store_benchmark_runs_and_exits_0(tmp_path, capsys):
    assert main(["bench", "--rows", "2000", "--dims", "4", "--batches", "64,128", "--repeats", "2", "--flat-steps", "2",
                 "--dir", str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").exists()
