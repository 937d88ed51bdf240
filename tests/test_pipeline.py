"""The prefetch pipeline: same weights as the sequential loop, errors surface, nothing leaks."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig, TableConfig
from damo_hybrid.data.synthetic import SyntheticCriteo
from damo_hybrid.errors import PipelineError
from damo_hybrid.models import DeepFM
from damo_hybrid.trainer import Trainer


def _run(path, prefetch, steps=25, opt=OptimizerConfig.adagrad(0.05), fail_at=None, interrupt_at=None):
    torch.manual_seed(0)
    data = SyntheticCriteo(256, seed=1, vocab_min=200, vocab_max=2000, n_sparse=6, n_dense=3)

    def load(i):
        if fail_at is not None and i == fail_at:
            raise OSError(f"bad input file at batch {i}")
        return data.batch(i)

    tables = [TableConfig("emb", 8, initializer=InitializerConfig.normal(std=0.05, seed=2), optimizer=opt),
              TableConfig("lin", 1, initializer=InitializerConfig.zeros(), optimizer=opt)]
    store = EmbeddingStore(path, tables)
    # 3,000 rows per table, far fewer than the keys the run touches: evictions and reloads happen
    model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=3000, backend="cpu")
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), load)

    def progress(step, loss):
        if interrupt_at is not None and step == interrupt_at:
            raise KeyboardInterrupt

    try:
        trainer.fit(steps, prefetch=prefetch, progress=progress)
    except BaseException:
        model.sparse.flush()  # what a caller does on Ctrl-C or a failed stage: keep the work done
        store.close()
        raise
    model.sparse.flush()
    return store, model, trainer


@pytest.mark.parametrize("opt", [OptimizerConfig.adagrad(0.05), OptimizerConfig.adam(0.01)], ids=["adagrad", "adam"])
def test_pipelined_equals_sequential(tmp_path, opt):
    s1, m1, _ = _run(tmp_path / "seq", prefetch=False, opt=opt)
    s2, m2, t2 = _run(tmp_path / "pipe", prefetch=True, opt=opt)
    try:
        ev = sum(c.stats.evictions for c in m2.sparse.caches.values())
        assert ev > 0, "the test must force evictions"
        assert t2.pipeline_stats is not None and t2.pipeline_stats.batches == 25
        for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
            assert n1 == n2
            np.testing.assert_array_equal(p1.numpy(), p2.numpy(), err_msg=n1)  # bit for bit on the CPU
        for table in ("emb", "lin"):
            k1 = np.concatenate([k for k, _ in s1.scan(table)])
            k2 = np.concatenate([k for k, _ in s2.scan(table)])
            np.testing.assert_array_equal(k1, k2)
            r1, _ = s1.read_rows(table, k1)
            r2, _ = s2.read_rows(table, k2)
            np.testing.assert_array_equal(r1.weights, r2.weights)
            np.testing.assert_array_equal(r1.state, r2.state)
            np.testing.assert_array_equal(r1.count, r2.count)
            assert s1.step(table) == s2.step(table) == 25
    finally:
        s1.close()
        s2.close()


def test_stage_error_is_reraised_with_cause_and_nothing_leaks(tmp_path):
    before = threading.active_count()
    with pytest.raises(PipelineError, match="loader stage failed") as ei:
        _run(tmp_path / "p", prefetch=True, fail_at=7)
    assert isinstance(ei.value.__cause__, OSError) and "batch 7" in str(ei.value.__cause__)
    assert threading.active_count() == before
    with EmbeddingStore(tmp_path / "p") as s:
        assert s.step("emb") == 7  # batches 0..6 were trained and kept


@pytest.mark.parametrize("stage, exc, line", [
    ("loader", ValueError("d.csv:7: label 'x' is not a number\nmore detail"),
     "the loader stage failed: d.csv:7: label 'x' is not a number"),
    ("loader", KeyError("user"), "the loader stage failed: KeyError: 'user'"),
    ("host manager", MemoryError(), "the host manager stage failed: MemoryError"),
    ("host manager", OSError(5, "Input/output error"),
     "the host manager stage failed: OSError: [Errno 5] Input/output error"),
], ids=["value-error", "key-error", "no-message", "os-error"])
def test_a_stage_error_reads_as_one_line_without_requoting(stage, exc, line):
    """The stage's message as it is (``repr`` would quote it again: ``ValueError("...'x'...")``),
    its first line only, the type named where the message alone does not say what failed."""
    from damo_hybrid.cli.failure import REFUSED, explain
    from damo_hybrid.pipeline import Pipeline

    def load(i):
        if stage == "loader" and i == 2:
            raise exc
        return i

    def prepare(b):
        if stage == "host manager" and b == 2:
            raise exc
        return b

    with pytest.raises(PipelineError) as ei:
        with Pipeline(load, prepare, lambda p: None, 0, 5) as pipe:
            for _ in pipe:
                pass
    assert str(ei.value) == line
    assert ei.value.__cause__ is exc  # the whole message stays in the cause
    if type(exc) is ValueError:  # bad input: the command line prints the line as it is
        f = explain(ei.value, "train")
        assert (f.status, f.line) == (REFUSED, line)


def test_a_huge_stage_error_is_cut_to_one_short_line():
    from damo_hybrid.cli.failure import MAX_LINE
    from damo_hybrid.pipeline import Pipeline

    def load(i):
        raise RuntimeError("x" * 100_000 + "'quoted'")

    with pytest.raises(PipelineError) as ei:
        with Pipeline(load, lambda b: b, lambda p: None, 0, 3) as pipe:
            for _ in pipe:
                pass
    text = str(ei.value)
    assert text.startswith("the loader stage failed: RuntimeError: xxx") and text.endswith("'quoted'")
    assert " ... " in text and len(f"damo-hybrid train: error: {text}") < MAX_LINE


def test_ctrl_c_stops_cleanly_with_pins_released(tmp_path):
    before = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "p", prefetch=True, interrupt_at=5)
    assert threading.active_count() == before
    with EmbeddingStore(tmp_path / "p") as s:
        assert s.step("emb") == 5 and s.count_rows("emb") > 0


@pytest.mark.parametrize("name", ["deepfm", "wide_deep", "dcn", "dlrm"])
def test_every_model_learns_through_the_pipeline(tmp_path, name):
    from damo_hybrid.models import MODELS

    torch.manual_seed(0)
    data = SyntheticCriteo(512, seed=4, vocab_min=100, vocab_max=1000, n_sparse=8, n_dense=4, signal=2.0)
    held = SyntheticCriteo(512, seed=4, vocab_min=100, vocab_max=1000, n_sparse=8, n_dense=4, signal=2.0, split=1)
    opt = OptimizerConfig.adagrad(0.1)
    tables = [TableConfig("emb", 8, initializer=InitializerConfig.normal(std=0.05), optimizer=opt),
              TableConfig("lin", 1, initializer=InitializerConfig.zeros(), optimizer=opt)]
    with EmbeddingStore(tmp_path / "s", tables) as store:
        model = MODELS[name](store, data.sparse_fields, 4, cache_mb=1)
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=3e-3), data.batch, held.batch)
        before, _ = trainer.evaluate(3)
        s = trainer.fit(40, eval_batches=3)
        assert np.isfinite(s.train_logloss)
        assert s.auc is not None and s.auc > max(0.6, before + 0.05), (before, s.auc)


def test_at_most_two_prepared_batches_are_alive():
    """Double buffering: while the caller trains batch t only t+1 may be prepared (pinned)."""
    import time

    from damo_hybrid.pipeline import Pipeline

    lock = threading.Lock()
    alive, peak = [0], [0]

    def prepare(b):
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        return b

    def done(_):
        with lock:
            alive[0] -= 1

    seen = []
    with Pipeline(lambda i: i, prepare, done, 0, 12) as pipe:
        for i, _, p in pipe:
            time.sleep(0.01)  # training is slower than preparing: the host manager runs ahead if it may
            seen.append(i)
            done(p)
    assert seen == list(range(12))
    assert peak[0] == 2


@pytest.mark.parametrize("prefetch", [False, True], ids=["sequential", "pipelined"])
def test_a_failing_forward_leaves_no_rows_pinned(tmp_path, prefetch):
    data = SyntheticCriteo(64, seed=1, vocab_min=50, vocab_max=500, n_sparse=4, n_dense=3)
    tables = [TableConfig("emb", 4), TableConfig("lin", 1)]
    with EmbeddingStore(tmp_path / "s", tables) as store:
        model = DeepFM(store, data.sparse_fields, 3, hidden=(8,), backend="cpu")
        calls = [0]
        real = model.deep.forward

        def flaky(x):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("forward failed")
            return real(x)

        model.deep.forward = flaky
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), data.batch)
        with pytest.raises((RuntimeError, PipelineError)):
            trainer.fit(10, prefetch=prefetch)
        assert all((c.pins == 0).all() for c in model.sparse.caches.values())
        trainer.fit(2, prefetch=prefetch)  # and training goes on
