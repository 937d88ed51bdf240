"""A resume checks that the checkpoint is its run's, falls back past damaged checkpoints, and swaps
the store in so that no interrupt leaves it half replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from damo_hybrid import EmbeddingStore
from damo_hybrid.cli import main
from damo_hybrid.pipeline.checkpoint import complete_checkpoints

ARGS = ["train", "--steps", "10", "--batch-size", "128", "--dim", "4", "--vocab-min", "200", "--vocab-max", "2000",
        "--cache-mb", "4", "--eval-batches", "0", "--quiet", "--checkpoint-every", "5", "--threads", "1"]


def _run(*extra, steps=None):
    argv = list(ARGS) + list(extra)
    if steps is not None:
        argv[argv.index("--steps") + 1] = str(steps)
    return main(argv)


def _weights(path):
    with EmbeddingStore(path, read_only=True) as s:
        keys = np.concatenate([k for k, _ in s.scan("emb")])
        rows, _ = s.read_rows("emb", keys)
        return keys, rows.weights.copy()


def _err_line(capsys):
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("WARNING")]
    assert len(err) == 1, err
    assert len(err[0]) < 400
    return err[0]


def test_another_runs_checkpoint_dir_is_refused_and_the_store_keeps_its_rows(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run("--store", str(a)) == 0
    assert _run("--store", str(b), "--checkpoint-dir", str(tmp_path / "cb"), "--seed", "1") == 0
    before = _weights(a)
    capsys.readouterr()
    assert _run("--store", str(a), "--checkpoint-dir", str(tmp_path / "cb"), "--resume", steps=15) == 2
    line = _err_line(capsys)
    assert "--store" in line and str(b) in line and str(a) in line, line
    after = _weights(a)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("flag,value,shown", [
    ("--batch-size", "64", "--batch-size 128 (this run: 64)"),
    ("--vocab-max", "3000", "--vocab-max 2000 (this run: 3000)"),
    ("--dense-lr", "0.01", "--dense-lr 0.001 (this run: 0.01)"),
    ("--model", "dcn", None),  # the model class check speaks first
])
def test_a_changed_option_is_refused_naming_both_values(tmp_path, capsys, flag, value, shown):
    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    before = _weights(s)
    capsys.readouterr()
    assert _run("--store", str(s), "--resume", flag, value, steps=15) == 2
    line = _err_line(capsys)
    if shown is not None:
        assert shown in line and "--allow-run-change" in line, line
    else:
        assert "dcn" in line.lower() or "DCN" in line
    np.testing.assert_array_equal(before[1], _weights(s)[1])


def test_allow_run_change_resumes_and_says_what_changed(tmp_path, capsys):
    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    capsys.readouterr()
    assert _run("--store", str(s), "--resume", "--batch-size", "64", "--allow-run-change", steps=15) == 0
    out = capsys.readouterr().out
    assert "--batch-size 64 instead of its 128" in out and "resuming from" in out


def test_restoring_into_a_new_store_folder_is_not_a_mismatch(tmp_path, capsys):
    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    assert _run("--store", str(tmp_path / "moved"), "--checkpoint-dir", str(tmp_path / "s.ckpt"), "--resume",
                steps=15) == 0
    assert "resuming from" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate-sst", "replace-meta", "remove-file"])
def test_a_damaged_store_part_falls_back_to_the_older_checkpoint(tmp_path, capsys, damage):
    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    newest = complete_checkpoints(tmp_path / "s.ckpt")[0]
    assert newest.name == "step-10"
    files = sorted((newest / "store" / "db").glob("*.sst")) or sorted((newest / "store" / "db").glob("*.log"))
    if damage == "truncate-sst":  # a new file: the checkpoint's tables are hard links of the store's
        data = files[0].read_bytes()
        files[0].unlink()
        files[0].write_bytes(data[: len(data) // 2])
    elif damage == "replace-meta":
        meta = json.loads((newest / "store" / "meta.json").read_text())
        meta["tables"]["emb"]["step"] = 999
        (newest / "store" / "meta.json").write_text(json.dumps(meta))
    else:
        files[0].unlink()
    capsys.readouterr()
    assert _run("--store", str(s), "--resume", steps=15) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step-10" in out and "resuming from" in out and "step-5" in out
    assert ".restoring" not in out and ".partial" not in out
    assert any(p.name.startswith("step-10.damaged-") for p in (tmp_path / "s.ckpt").iterdir())


def test_a_checkpoint_that_fails_to_restore_is_set_aside_and_named(tmp_path, capsys):
    """A checkpoint without a manifest (an older version's) whose store copy does not open."""
    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    newest = complete_checkpoints(tmp_path / "s.ckpt")[0]
    marker = json.loads((newest / "TRAINING.json").read_text())
    del marker["manifest"]
    (newest / "TRAINING.json").write_text(json.dumps(marker))
    (newest / "store" / "meta.json").write_text("{not json")
    capsys.readouterr()
    assert _run("--store", str(s), "--resume", steps=15) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest} cannot be restored" in out and "resuming from" in out and "step-5" in out
    assert ".restoring" not in out


def test_sigint_during_the_store_swap_leaves_the_restored_store(tmp_path, capsys, monkeypatch):
    from damo_hybrid.cli import resume

    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    ck = complete_checkpoints(tmp_path / "s.ckpt")[0]
    with EmbeddingStore(ck / "store", read_only=True) as c:
        want = np.concatenate([k for k, _ in c.scan("emb")])
    with EmbeddingStore(s) as live:  # work after the checkpoint: the swap must replace it
        live.apply_gradients("emb", np.array([10**15], np.uint64), np.ones((1, 5), np.float32))
    real = os.rename
    calls = []

    def rename(a, b):
        r = real(a, b)
        if str(a) == str(s):  # the old store has gone aside, the new one is not in yet
            calls.append(a)
            os.kill(os.getpid(), signal.SIGINT)
        return r

    monkeypatch.setattr(resume.os, "rename", rename)
    assert _run("--store", str(s), "--resume", steps=15) == 130
    monkeypatch.setattr(resume.os, "rename", real)
    assert calls
    keys, _ = _weights(s)
    np.testing.assert_array_equal(np.sort(keys), np.sort(want))  # the checkpoint's rows, whole
    assert not any(p.name.startswith(".s.") for p in tmp_path.iterdir())


_KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from damo_hybrid.cli import main, resume
    real, store = os.rename, sys.argv[sys.argv.index("--store") + 1]
    def rename(a, b):
        r = real(a, b)
        if str(a) == store:
            os.kill(os.getpid(), signal.SIGKILL)
        return r
    resume.os.rename = rename
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_between_the_swaps_renames_loses_no_store(tmp_path, capsys):
    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    before = _weights(s)
    argv = list(ARGS) + ["--store", str(s), "--resume"]
    argv[argv.index("--steps") + 1] = "15"
    p = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, *argv], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not s.exists() and (tmp_path / ".s.old").is_dir()  # killed with the old store aside
    capsys.readouterr()
    # any later train on the store puts it back first
    assert _run("--store", str(s), "--resume", steps=15) == 0
    out = capsys.readouterr().out
    assert "put its earlier store back" in out and "resuming from" in out
    assert s.is_dir() and not (tmp_path / ".s.old").exists()
    assert len(_weights(s)[0]) >= len(before[0])


@pytest.mark.parametrize("damage", ["truncate", "remove", "replace-small"])
def test_a_store_checkpoint_whose_files_differ_from_its_manifest_is_refused(tmp_path, damage):
    from damo_hybrid import OptimizerConfig, TableConfig
    from damo_hybrid.errors import DamagedOutputError

    tables = [TableConfig("t", 4, optimizer=OptimizerConfig.sgd(0.1))]
    with EmbeddingStore(tmp_path / "s", tables) as s:
        s.apply_gradients("t", np.arange(5000, dtype=np.uint64), np.ones((5000, 4), np.float32))
        s.checkpoint(tmp_path / "ck")
    db = tmp_path / "ck" / "db"
    if damage == "replace-small":
        victim = tmp_path / "ck" / "meta.json"
        text = victim.read_text()
        victim.write_text(text.replace('"step": 1', '"step": 7'))
        assert victim.read_text() != text
    else:
        victim = max(db.iterdir(), key=lambda p: p.stat().st_size)
        data = victim.read_bytes()
        victim.unlink()  # a new file: the checkpoint's tables are hard links of the store's
        if damage == "truncate":
            victim.write_bytes(data[:-10])
    with pytest.raises(DamagedOutputError, match=victim.name):
        EmbeddingStore.from_checkpoint(tmp_path / "ck", tmp_path / "restored", tables)
    assert not (tmp_path / "restored").exists() or not any((tmp_path / "restored").iterdir())


def test_a_full_disk_while_restoring_is_not_damage_and_sets_nothing_aside(tmp_path, capsys, monkeypatch):
    """Before: the copy's ENOSPC (a shutil.Error without errno) set every checkpoint aside as damaged,
    and the next --resume started from scratch over the trained store."""
    import errno
    import shutil

    from damo_hybrid.storage import checkpoint as store_ckpt

    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    before = _weights(s)

    def full(src, dst, **kw):
        raise shutil.Error([(str(src), str(dst), f"[Errno {errno.ENOSPC}] No space left on device")])

    monkeypatch.setattr(store_ckpt.shutil, "copytree", full)
    capsys.readouterr()
    assert _run("--store", str(s), "--resume", steps=15) == 3
    assert "No space left on device" in _err_line(capsys)
    assert not [p for p in (tmp_path / "s.ckpt").iterdir() if ".damaged-" in p.name]
    np.testing.assert_array_equal(before[1], _weights(s)[1])


def test_a_resume_whose_checkpoints_were_all_set_aside_refuses_to_start_from_scratch(tmp_path, capsys):
    s = tmp_path / "s"
    assert _run("--store", str(s)) == 0
    for ck in complete_checkpoints(tmp_path / "s.ckpt"):
        ck.rename(ck.with_name(f"{ck.name}.damaged-0000"))
    before = _weights(s)
    capsys.readouterr()
    assert _run("--store", str(s), "--resume", steps=15) == 2
    assert "no checkpoint under" in _err_line(capsys)
    np.testing.assert_array_equal(before[1], _weights(s)[1])


def test_a_store_given_as_a_link_resumes_again_and_again(tmp_path, capsys):
    """Before: the swap replaced the link by a folder, and the next resume saw another run's store."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "s"
    link.symlink_to(real / "store")
    ck = str(tmp_path / "ck")
    assert _run("--store", str(link), "--checkpoint-dir", ck) == 0
    for steps in (15, 20):
        assert _run("--store", str(link), "--checkpoint-dir", ck, "--resume", steps=steps) == 0
    assert link.is_symlink() and (real / "store" / "meta.json").is_file()


def test_an_empty_folder_made_after_a_killed_swap_gives_way_to_the_set_aside_copy(tmp_path):
    from damo_hybrid.storage.files import aside_path, recover_dir

    dst = tmp_path / "out"
    aside = aside_path(dst)
    aside.mkdir()
    (aside / "rows").write_text("the only copy")
    dst.mkdir()  # an open that found nothing made it
    assert recover_dir(dst) == dst
    assert (dst / "rows").read_text() == "the only copy" and not aside.exists()


def test_a_sharded_marker_without_its_number_of_ranks_is_damage_not_a_bug(tmp_path):
    from damo_hybrid.dist.checkpoint import COMPLETE, restore_shard
    from damo_hybrid.errors import DamoHybridError

    ck = tmp_path / "step-000000005"
    ck.mkdir()
    (ck / COMPLETE).write_text(json.dumps({"sharding_version": 1, "step": 5}))
    with pytest.raises(DamoHybridError, match="damaged: no number of ranks"):
        restore_shard(ck, tmp_path / "dest", 0, 1)
