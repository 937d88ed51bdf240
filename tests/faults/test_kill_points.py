"""kill -9 at many random points of a training run with checkpoints on.

One chain: start the run (``--resume``), SIGKILL it after a random delay (during start-up,
training, write-back or a checkpoint), check that the store reopens with no corrupt row and that
the newest checkpoint is complete, resume, kill again, ... and finally let it finish. Every resume
restarts from the newest checkpoint, so the chain ends with the rows, optimizer state and dense
weights of an uninterrupted run only if each resume continued exactly."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from damo_hybrid.pipeline.checkpoint import latest_checkpoint, load_trainer_state

KILLS = int(os.environ.get("DAMO_FAULT_KILLS", "20"))
ARGS = ["train", "--steps", "24", "--batch-size", "256", "--dim", "8", "--vocab-min", "300", "--vocab-max", "3000",
        "--cache-mb", "2", "--eval-batches", "0", "--quiet", "--checkpoint-every", "2", "--threads", "1"]


def _cmd(store, *extra):
    return [sys.executable, "-m", "damo_hybrid.cli", *ARGS, "--store", str(store), *extra]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_at_random_points_then_resume_matches_uninterrupted_run(tmp_path, snapshot):
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    subprocess.run(_cmd(ref), check=True, capture_output=True, timeout=300)
    full = time.perf_counter() - t0

    victim, ckpts = tmp_path / "victim", str(tmp_path / "victim") + ".ckpt"
    rng = random.Random(1234)
    kills = 0
    for _ in range(KILLS * 3):
        if kills == KILLS:
            break
        err = tmp_path / "stderr.txt"
        with open(err, "wb") as f:
            p = subprocess.Popen(_cmd(victim, "--resume"), stdout=subprocess.DEVNULL, stderr=f)
        time.sleep(rng.uniform(0.2, full))
        if p.poll() is not None:  # finished before the kill: start over from scratch to keep killing
            assert p.returncode == 0, f"after {kills} kills the run failed: {err.read_text()}"
            shutil.rmtree(victim)
            shutil.rmtree(ckpts)
            continue
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        if (victim / "meta.json").exists():
            snapshot(victim)  # reopens; every row decodes (length, version and checksum checked)
        ck = latest_checkpoint(ckpts)
        if ck is not None:
            assert load_trainer_state(ck)["step"] % 2 == 0
            snapshot(ck / "store")
    assert kills == KILLS

    r = subprocess.run(_cmd(victim, "--resume"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = snapshot(ref), snapshot(victim)
    for t in a:
        np.testing.assert_array_equal(a[t][0], b[t][0])
        np.testing.assert_allclose(a[t][1], b[t][1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[t][2], b[t][2], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[t][3], b[t][3])
    sa, sb = load_trainer_state(latest_checkpoint(str(ref) + ".ckpt")), load_trainer_state(latest_checkpoint(ckpts))
    assert sa["step"] == sb["step"] == 24
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-5, atol=1e-6)
