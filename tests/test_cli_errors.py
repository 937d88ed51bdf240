"""The living list of bad invocations: each is one line on stderr naming what was wrong, exit 2.

``{tmp}`` in an argument is a fresh temporary folder, ``{dir}`` an existing folder in it and
``{ro}`` a folder nobody may write to (skipped where the tests run as a user who may).
"""

from __future__ import annotations

import os
import re

import pytest

from damo_hybrid.cli import main

T = ["train", "--quiet"]
BAD: list[tuple[list[str], str]] = [
    # train: numbers out of range or of the wrong type
    (T + ["--threads", "-2"], r"--threads: must be >= 1, got -2"),
    (T + ["--threads", "0"], r"--threads: must be >= 1, got 0"),
    (T + ["--threads", "two"], r"--threads: must be an integer, got 'two'"),
    (T + ["--steps", "-5"], r"--steps: must be >= 1, got -5"),
    (T + ["--steps", "0"], r"--steps: must be >= 1"),
    (T + ["--epochs", "0"], r"--epochs: must be >= 1, got 0"),
    (T + ["--checkpoint-every", "-1"], r"--checkpoint-every: must be >= 0, got -1"),
    (T + ["--seed", "-1"], r"--seed: must be in \[0, 4294967295\], got -1"),
    (T + ["--eval-batches", "-1"], r"--eval-batches: must be >= 0, got -1"),
    (T + ["--eval-fraction", "1"], r"--eval-fraction: must lie in \[0.0, 1.0\), got 1"),
    (T + ["--eval-fraction", "-0.1"], r"--eval-fraction: must lie in"),
    (T + ["--eval-fraction", "nan"], r"--eval-fraction: must lie in"),
    (T + ["--batch-size", "0"], r"--batch-size: must be >= 1, got 0"),
    (T + ["--dim", "0"], r"--dim: must be in \[1, 65535\], got 0"),
    (T + ["--dim", "70000"], r"--dim: must be in \[1, 65535\]"),
    (T + ["--lr", "0"], r"--lr: must lie in \(0.0, inf\), got 0"),
    (T + ["--lr", "-1"], r"--lr: must lie in"),
    (T + ["--lr", "inf"], r"--lr: must lie in"),
    (T + ["--dense-lr", "0"], r"--dense-lr: must lie in"),
    (T + ["--cache-mb", "0"], r"--cache-mb: must lie in \(0.0, inf\), got 0"),
    (T + ["--cache-mb", "-3"], r"--cache-mb: must lie in"),
    (T + ["--device-cache-mb", "0"], r"--device-cache-mb: must lie in"),
    (T + ["--vocab-min", "0"], r"--vocab-min: must be >= 1"),
    (T + ["--vocab-min", "100", "--vocab-max", "10"], r"--vocab-max 10 is below --vocab-min 100"),
    (T + ["--model", "xgboost"], r"--model: invalid choice: 'xgboost'"),
    (T + ["--optimizer", "rmsprop"], r"--optimizer: invalid choice: 'rmsprop'"),
    (T + ["--backend", "tpu"], r"--backend: invalid choice: 'tpu'"),
    (T + ["--format", "xml"], r"--format: invalid choice: 'xml'"),
    (T + ["--colour", "red"], r"unrecognized arguments: --colour red"),
    # train: files and folders
    (T + ["--data", "{tmp}/missing.tsv"], r"no data file .*missing\.tsv"),
    (T + ["--data", "{dir}"], r"--data .* is a directory; give a data file"),
    (T + ["--data", "{dir}/x.tsv", "--eval-data", "{dir}"], r"--eval-data .* is a directory"),
    (T + ["--json", "{dir}"], r"--json .* is a directory; give a file name"),
    (T + ["--json", "{tmp}/no/such/folder/out.json"], r"--json .*: the folder .* does not exist"),
    (T + ["--json", "{ro}/out.json"], r"--json .* is not writable"),
    (T + ["--resume"], r"--resume and --checkpoint-every need --store"),
    (T + ["--checkpoint-every", "5"], r"--resume and --checkpoint-every need --store"),
    (T + ["--config", "{tmp}/missing.toml"], r"missing\.toml"),
    # issue 28, classes 4 and 8: no input at all, and huge arguments quoted clipped
    (T + ["--stream", "--data", "{dir}"], r"no data file at .*adir"),
    (T + ["--stream", "--data", "{tmp}/nomatch*.tsv"], r"no data file at .*nomatch\*\.tsv"),
    (T + ["--table-compression", "qr:" + "x" * 5000], r"--table-compression: qr takes .*'xxx.*\.\.\.'"),
    (T + ["--model", "m" * 5000], r"--model: invalid choice: 'mmm.* \.\.\. "),
    (T + ["--lr", "9" * 5000 + "x"], r"--lr: must be a number, got '999.*\.\.\.'"),
    # other commands
    (["export", "--store", "{tmp}/nostore", "--out", "{tmp}/w.npz"], r"no store at .*nostore"),
    (["export", "--store", "{tmp}/nostore", "--out", "{dir}"], r"--out .* is a directory; give a file name"),
    (["export", "--store", "{tmp}/nostore", "--out", "{ro}/w.npz"], r"--out .* is not writable"),
    (["export", "--out", "{tmp}/w.npz"], r"the following arguments are required: --store"),
    (["dump", "--store", "{tmp}/nostore", "--out", "{dir}"], r"--out .* is a directory"),
    (["dump", "--store", "{tmp}/s", "--out", "{tmp}/d", "--min-count", "-1"], r"--min-count: must be >= 0, got -1"),
    (["dump", "--store", "{tmp}/s", "--out", "{tmp}/d", "--expire-days", "0"], r"--expire-days: must lie in"),
    (["dump", "--store", "{tmp}/s", "--out", "{tmp}/d", "--format", "csv"], r"--format: invalid choice: 'csv'"),
    (["inspect"], r"the following arguments are required: --store"),
    (["inspect", "--store", "{tmp}/nostore"], r"no store at .*nostore"),
    (["demo", "--steps", "0"], r"--steps: must be >= 1, got 0"),
    (["demo", "--lr", "0"], r"--lr: must lie in"),
    (["bench", "--rows", "0"], r"--rows: must be >= 1, got 0"),
    (["bench", "--train", "--train-steps", "0"], r"--train-steps: must be >= 1"),
    (["bench", "--train", "--row-dtypes", "float32,fp8"], r"unknown row dtypes \['fp8'\]"),
    (["train", "--row-dtype", "fp8"], r"--row-dtype: invalid choice: 'fp8'"),
    (["bench", "--json", "{dir}"], r"--json .* is a directory"),
    (["frobnicate"], r"invalid choice: 'frobnicate'"),
    ([], r"required: cmd|the following arguments are required"),
    # issue 28, class 10: every bench argument checked before any work (tests/test_bench_status.py has more)
    (["bench", "--train", "--fractions", "-1"], r"--fractions: each must lie in \(0, 1\], got -1"),
    (["bench", "--fractions", "0.5"], r"--fractions applies to bench --train"),
    (["bench", "--train", "--host"], r"give one benchmark at a time, got --train and --host"),
    (["bench", "--dims", "16,0"], r"--dims: each must be in \[1, 65535\], got 0"),
    (["bench", "--rows", "10", "--batches", "64"], r"--batches 64 exceeds --rows 10"),
    (["bench", "--gpu", "--device-fraction", "2"], r"--device-fraction: must lie in"),
    (["bench", "--gpu", "--gpu-rows", "0"], r"--gpu-rows: must be >= 1, got 0"),
    (["bench", "--host", "--host-threads", "two"], r"--host-threads: 'two' is not an integer"),
    (["bench", "--compression", "--ratios", "0"], r"--ratios: each must lie in \[1, inf\), got 0"),
    (["bench", "--dir", "{tmp}/nowhere"], r"--dir .*nowhere: no such folder"),
]


def _expand(args: list[str], tmp, ro) -> list[str]:
    return [a.format(tmp=tmp, dir=tmp / "adir", ro=ro) for a in args]


@pytest.mark.parametrize("args, why", BAD, ids=[" ".join(a) or "(none)" for a, _ in BAD])
def test_bad_invocation_is_one_clear_line(tmp_path, capsys, args, why):
    (tmp_path / "adir").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if "{ro}" in " ".join(args) and os.access(ro, os.W_OK):
            pytest.skip("running as a user who may write anywhere (root): no unwritable folder to test with")
        assert main(_expand(args, tmp_path, ro)) == 2
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("damo-hybrid"), err[0]
    assert re.search(why, err[0]), err[0]
    assert "Traceback" not in err[0]


def test_the_list_is_long_enough():
    assert len(BAD) >= 40


def test_an_interrupt_inside_the_jit_compiler_waits_until_it_returns(monkeypatch):
    """An exception raised in llvmlite's Python callbacks (called from native code) crashed the
    process with a segmentation fault; there the signal is delivered again a moment later."""
    import signal
    import sys
    import threading

    from damo_hybrid.cli import signals

    def frame_in(module: str):
        ns = {"__name__": module, "sys": sys}
        exec("def f():\n    return sys._getframe()\n", ns)
        return ns["f"]()

    sent = []
    monkeypatch.setattr(signals.os, "kill", lambda pid, sig: sent.append(sig))
    timers = []

    class Timer(threading.Timer):
        def start(self):
            timers.append(self)
            self.function(*self.args)

    monkeypatch.setattr(signals.threading, "Timer", Timer)
    signals._interrupt(signal.SIGTERM, frame_in("llvmlite.binding.executionengine"))  # no exception
    assert sent == [signal.SIGTERM] and len(timers) == 1
    with pytest.raises(signals.Terminated):
        signals._interrupt(signal.SIGTERM, frame_in("damo_hybrid.pipeline.trainer"))
    with pytest.raises(KeyboardInterrupt):
        signals._interrupt(signal.SIGINT, frame_in("damo_hybrid.pipeline.trainer"))


def test_a_signal_still_deferred_when_the_command_ends_is_not_sent_again_and_sets_the_exit_status(monkeypatch):
    """A re-send timer outliving the block hit the restored default handler (the process died
    after its work) and, not a daemon, held the interpreter's exit; now it is cancelled and the
    command exits 143."""
    import signal
    import sys

    from damo_hybrid.cli import signals

    ns = {"__name__": "numba.core.compiler", "sys": sys}
    exec("def f():\n    return sys._getframe()\n", ns)
    sent = []
    monkeypatch.setattr(signals.os, "kill", lambda pid, sig: sent.append(sig))
    with signals.sigterm_as_interrupt() as late:
        signals._interrupt(signal.SIGTERM, ns["f"]())  # deferred: inside the compiler
        (timer,) = late.timers
        assert timer.daemon and signal.SIGTERM in late.pending
    assert not timer.is_alive() or timer.finished.is_set()  # cancelled with the block
    late._again(signal.SIGTERM)  # a retry that fires anyway does nothing once the block is over
    assert sent == [] and late.exit_code(0) == 143
    assert signal.getsignal(signal.SIGTERM) is not signals._interrupt


@pytest.mark.parametrize("table, why", [
    ('[fields.Z9]\nrow-dtype = "float16"\n',
     r"error: .*run\.toml: \[fields\] names fields \['Z9'\] the data does not have; its fields: \['C1', "),
    ('[fields.C3]\nrowdtype = "float16"\n',
     r"error: .*run\.toml: unknown \[fields\.C3\] options \['rowdtype'\]; known: \['row-dtype', 'table-compression'\]"),
], ids=["unknown-field", "unknown-option"])
def test_a_bad_fields_table_names_the_config_file_and_the_key(tmp_path, capsys, table, why):
    """As a bad ``[train]`` key does: the file, then the table and the key, in one line."""
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nsteps = 1\nbatch-size = 16\nvocab-min = 100\nvocab-max = 1000\n" + table)
    assert main(["train", "--quiet", "--config", str(cfg), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 300, err
    assert re.search(why, err[0]), err[0]
    assert not (tmp_path / "s").exists()  # refused before any store is made
