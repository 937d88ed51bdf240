"""Checkpoint and resume: a run killed with SIGKILL and resumed ends like an uninterrupted one."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from damo_hybrid import EmbeddingStore
from damo_hybrid.pipeline.checkpoint import latest_checkpoint, load_trainer_state

ARGS = ["train", "--steps", "30", "--batch-size", "256", "--dim", "8", "--vocab-min", "300", "--vocab-max", "3000",
        "--cache-mb", "4", "--eval-batches", "0", "--quiet", "--checkpoint-every", "5", "--threads", "1"]


def _cmd(store, *extra):
    return [sys.executable, "-m", "damo_hybrid.cli", *ARGS, "--store", str(store), *extra]


def _rows(path):
    with EmbeddingStore(path, read_only=True) as s:
        out = {}
        for t in s.tables:
            keys = np.concatenate([k for k, _ in s.scan(t)])
            rows, _ = s.read_rows(t, keys)
            out[t] = (keys, rows)
        return out


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), check=True, capture_output=True, timeout=300)

    victim = tmp_path / "victim"
    p = subprocess.Popen(_cmd(victim), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(str(victim) + ".ckpt") is None or "step-10" not in str(latest_checkpoint(str(victim) + ".ckpt")):
        assert p.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.2))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL

    r = subprocess.run(_cmd(victim, "--resume"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout

    a, b = _rows(ref), _rows(victim)
    assert a.keys() == b.keys() == {"emb"}  # deepfm: the first-order weight is the row's last column
    for t in a:
        np.testing.assert_array_equal(a[t][0], b[t][0])
        np.testing.assert_allclose(a[t][1].weights, b[t][1].weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[t][1].state, b[t][1].state, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[t][1].count, b[t][1].count)
    sa = load_trainer_state(latest_checkpoint(str(ref) + ".ckpt"))
    sb = load_trainer_state(latest_checkpoint(str(victim) + ".ckpt"))
    assert sa["step"] == sb["step"] == 30
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-5, atol=1e-6)


def test_interrupted_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "ck"
    (root / "step-40").mkdir(parents=True)  # no marker: a checkpoint cut off half-way
    (root / ".step-45.partial-abc").mkdir()
    assert latest_checkpoint(root) is None


def test_resume_with_another_model_is_a_clear_error_and_touches_nothing(tmp_path, capsys):
    from damo_hybrid.cli import main

    store = tmp_path / "s"
    argv = [a for a in ARGS if a != "--quiet"] + ["--quiet", "--store", str(store)]
    assert main(argv) == 0
    before = _rows(store)
    assert main(argv + ["--resume", "--model", "dcn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by a DeepFM" in err[0] and "builds a DCNv2" in err[0]
    after = _rows(store)
    for t in before:
        np.testing.assert_array_equal(before[t][0], after[t][0])
        np.testing.assert_array_equal(before[t][1].weights, after[t][1].weights)


class _Boom:
    """An object whose unpickling would run code: a planted trainer.pt must never do so."""

    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ.get("DAMO_PWNED", "/dev/null"),))


def test_trainer_state_loads_nothing_but_data(tmp_path, monkeypatch):
    from damo_hybrid.errors import DamoHybridError

    ck = tmp_path / "ck"
    ck.mkdir()
    flag = tmp_path / "pwned"
    monkeypatch.setenv("DAMO_PWNED", str(flag))
    torch.save({"step": 1, "x": _Boom()}, ck / "trainer.pt")
    with pytest.raises(DamoHybridError, match="holds objects a training checkpoint never holds"):
        load_trainer_state(ck)
    assert not flag.exists()


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(tmp_path, capsys):
    from damo_hybrid.cli import main

    store = tmp_path / "s"
    argv = list(ARGS) + ["--store", str(store)]  # 30 steps, a checkpoint every 5: step-25 and step-30 kept
    assert main(argv) == 0
    newest = latest_checkpoint(tmp_path / "s.ckpt")
    assert newest is not None and newest.name == "step-30"
    data = (newest / "trainer.pt").read_bytes()
    (newest / "trainer.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(argv[:argv.index("--steps") + 1] + ["35"] + argv[argv.index("--steps") + 2:] + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step-30" in out and "resuming from" in out and "step-25" in out


def test_a_new_run_over_old_checkpoints_stops_before_touching_the_store(tmp_path, capsys):
    from damo_hybrid.cli import main

    store = tmp_path / "s"
    argv = list(ARGS) + ["--store", str(store)]
    assert main(argv) == 0
    before = _rows(store)
    capsys.readouterr()
    assert main(argv) == 2  # trained, then died on "checkpoint step-5 already exists"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints" in err[0] and "--resume" in err[0]
    after = _rows(store)
    for t in before:
        np.testing.assert_array_equal(before[t][1].weights, after[t][1].weights)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs SIGTERM")
@pytest.mark.parametrize("with_store", [True, False], ids=["store", "temporary-store"])
def test_sigterm_stops_flushes_and_exits_143(tmp_path, with_store):
    store = tmp_path / "s"
    args = [a for a in ARGS if a not in ("--quiet",)]
    args[args.index("--steps") + 1] = "100000"
    args = [a for a in args if a not in ("--checkpoint-every", "5")]
    cmd = [sys.executable, "-m", "damo_hybrid.cli", *args] + (["--store", str(store)] if with_store else [])
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as errf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, env=env)
        banner = proc.stdout.readline()  # printed before training starts
        assert "damo-hybrid" in banner, banner + log.read_text()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the progress bar shows steps trained (however long JIT compiling took)
            done = [int(n) for n in re.findall(r"(\d+)/100000", log.read_text())]
            if done and max(done) >= 5:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    err = log.read_text()
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    if with_store:
        with EmbeddingStore(store, read_only=True) as s:  # not locked, and the trained rows were flushed
            assert s.count_rows("emb") > 0 and s.step("emb") > 0
    else:
        assert not list(tmp_path.glob("damo-train-*")), "the temporary store was not removed"


def test_a_run_cut_off_before_its_first_checkpoint_resumes_from_its_start(tmp_path, monkeypatch, capsys):
    """Killed after the first checkpoint had flushed rows into the store but before it was complete,
    a run left a store changed by its first steps and no checkpoint: resume used to start from step
    0 on those rows (every row of the first batches stepped twice). A run with checkpoints now saves
    its starting state first, and resume restores it."""
    import damo_hybrid.pipeline.trainer as trainer_mod
    from damo_hybrid.cli import main

    ref, victim = tmp_path / "ref", tmp_path / "victim"
    argv = list(ARGS)
    assert main(argv + ["--store", str(ref)]) == 0
    real = trainer_mod.save_training_checkpoint

    def cut_off(root, step, store, state):
        if step == 5:  # the caches are flushed into the store; then the process dies
            raise KeyboardInterrupt
        return real(root, step, store, state)

    monkeypatch.setattr(trainer_mod, "save_training_checkpoint", cut_off)
    assert main(argv + ["--store", str(victim)]) == 130  # "interrupted"
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv + ["--store", str(victim), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = _rows(ref), _rows(victim)
    for t in a:
        np.testing.assert_array_equal(a[t][0], b[t][0])
        np.testing.assert_allclose(a[t][1].weights, b[t][1].weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[t][1].count, b[t][1].count)


def test_data_that_ends_on_a_checkpoint_step_writes_that_checkpoint_once(tmp_path):
    """A stream of 4 batches with a checkpoint every 2: the last, empty segment used to write
    step-4 again (FileExistsError at the end of every such run)."""
    from damo_hybrid import EmbeddingStore as Store
    from damo_hybrid import InitializerConfig, OptimizerConfig
    from damo_hybrid.data.source import EndOfData
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.models import DeepFM
    from damo_hybrid.nn.models import model_tables
    from damo_hybrid.pipeline.checkpoint import complete_checkpoints
    from damo_hybrid.trainer import Trainer

    data = SyntheticCriteo(64, seed=1, vocab_min=50, vocab_max=400, n_sparse=4, n_dense=2)

    def batch(i):
        if i >= 4:
            raise EndOfData
        return data.batch(i)

    for prefetch in (True, False):
        root = tmp_path / f"ck-{prefetch}"
        with Store(tmp_path / f"s-{prefetch}", model_tables("deepfm", 4, OptimizerConfig.adagrad(0.05),
                                                           InitializerConfig.normal(std=0.01))) as store:
            m = DeepFM(store, data.sparse_fields, 2, hidden=(8,), backend="cpu")
            s = Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-3), batch).fit(10, prefetch=prefetch,
                                                                                checkpoint_every=2, checkpoint_dir=root)
        assert s.steps == 4
        assert [p.name for p in complete_checkpoints(root)] == ["step-4", "step-2"]


@pytest.mark.parametrize("junk", [b"truncated", b"", b"\x80\x02}q\x00(X"], ids=["text", "empty", "cut-pickle"])
def test_a_trainer_state_of_any_damage_is_a_typed_error(tmp_path, junk):
    """However a trainer.pt is damaged (the unpickler fails with IndexError on some), loading it
    says so with DamoHybridError, so a resume passes over it to an older checkpoint."""
    from damo_hybrid.errors import DamoHybridError
    from damo_hybrid.pipeline.checkpoint import load_trainer_state

    (tmp_path / "trainer.pt").write_bytes(junk)
    with pytest.raises(DamoHybridError, match="damaged"):
        load_trainer_state(tmp_path)
