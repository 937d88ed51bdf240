"""SIGKILL (and SIGINT/SIGTERM where the CLI runs) at named points inside every crash-safe write
of the package; the reader must then load the complete old or the complete new output, never a
mix and never, without a word, a fresh or empty one.

A point is ``module:attr`` and the number of the call at which the signal is sent (before the
call is made), as in ``_kill_child.arm``. Where a write renames more than once, every rename
(``os.rename``, ``os.replace``) is a point: the child is run with the signal armed at call 1,
2, ... until a run finishes without it firing. The old output is put in place before each run;
the new one is what an unarmed run writes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from damo_hybrid import EmbeddingStore, OptimizerConfig, TableConfig

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")]

CHILD = Path(__file__).with_name("_write_child.py")
TESTS = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
RENAMES = ("os:rename", "os:replace")
KILLED = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 143}


def _child(hook: str, nth: int, sig: signal.Signals, writer: str, *args: object) -> int:
    r = subprocess.run([sys.executable, str(CHILD), hook, str(nth), sig.name, writer, *map(str, args)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode in (0, KILLED[sig], -sig), r.stderr[-2000:]
    if writer == "cli" and sig != signal.SIGKILL and r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        assert len(lines) <= 1 and "Traceback" not in r.stderr, r.stderr[-2000:]  # one line, no traceback
    return r.returncode


def _every_point(hooks: tuple[str, ...], setup: Callable[[], None], run: Callable[[str, int], int],
                 check: Callable[[], str], extra: tuple[tuple[str, int], ...] = ()) -> set[str]:
    """Run the write killed at every call of each of ``hooks`` (and at each ``extra`` point),
    ``setup`` putting the old output back first; ``check`` says which output the reader found.
    Returns the outputs seen."""
    seen: set[str] = set()
    points = [(h, n) for h in hooks for n in range(1, 40)] + list(extra)
    done: set[str] = set()
    for hook, n in points:
        if hook in done:
            continue
        setup()
        code = run(hook, n)
        state = check()
        assert state in ("old", "new"), f"{hook} call {n}: the reader found {state}"
        seen.add(state)
        if code == 0:  # ran to the end without the hook firing: no more calls of this hook
            assert (hook, n) not in extra, f"{hook} call {n} never fired"
            done.add(hook)
        else:
            assert n < 39, f"{hook} is called more often than this test expects"
    return seen


def _no_leftovers(folder: Path, *keep: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)


# ------------------------------------------------------------------ npz and seed-format dumps
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store, ``old.npz``/``old.bin`` dumps of it and ``new.npz``/``new.bin`` after more steps."""
    root = tmp_path_factory.mktemp("dumps")
    tables = [TableConfig("group_0", 4, optimizer=OptimizerConfig.sgd(0.5)),
              TableConfig("group_1", 2, optimizer=OptimizerConfig.sgd(0.5))]
    from damo_hybrid.compat.seed_format import dump_seed_format

    with EmbeddingStore(root / "s", tables) as s:
        for i, name in enumerate(["group_0", "group_1"]):
            keys = np.arange(1, 300, dtype=np.uint64)
            s.apply_gradients(name, keys, np.ones((len(keys), 4 - 2 * i), np.float32))
        s.dump(root / "old.npz")
        dump_seed_format(s, root / "old.bin")
        keys = np.arange(200, 900, dtype=np.uint64)
        s.apply_gradients("group_0", keys, np.ones((len(keys), 4), np.float32))
        s.dump(root / "new.npz")
        dump_seed_format(s, root / "new.bin")
    return root


def _npz_state(path: Path, root: Path) -> str:
    with np.load(path) as z:
        got = {k: z[k] for k in z.files}
    for name in ("old", "new"):
        with np.load(root / f"{name}.npz") as z:
            if set(z.files) == set(got) and all(np.array_equal(z[k], got[k]) for k in z.files):
                return name
    return "a mix"


def _bin_state(path: Path, root: Path) -> str:
    from damo_hybrid.compat.seed_format import read_seed_format

    read_seed_format(path)  # whole: header, rows and length agree
    data = path.read_bytes()
    return next((n for n in ("old", "new") if (root / f"{n}.bin").read_bytes() == data), "a mix")


@pytest.mark.parametrize("writer", ["dump", "seed"])
def test_kill_9_inside_a_dump_leaves_the_old_or_the_new_file(tmp_path, store, writer):
    ext = "npz" if writer == "dump" else "bin"
    out = tmp_path / f"out.{ext}"
    state = _npz_state if writer == "dump" else _bin_state
    seen = _every_point(RENAMES, lambda: shutil.copy(store / f"old.{ext}", out),
                        lambda h, n: _child(h, n, signal.SIGKILL, writer, store / "s", out),
                        lambda: state(out, store),
                        extra=(("damo_hybrid.storage.files:fsync_dir", 1),))
    assert seen == {"old", "new"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("cmd", ["export", "dump --format seed"])
def test_ctrl_c_or_sigterm_inside_a_cli_dump_leaves_the_old_file_and_no_temp(tmp_path, store, cmd, sig):
    ext = "npz" if cmd == "export" else "bin"
    out = tmp_path / f"out.{ext}"
    shutil.copy(store / f"old.{ext}", out)
    code = _child("os:replace", 1, sig, "cli", *cmd.split(), "--store", store / "s", "--out", out)
    assert code == KILLED[sig]
    assert (_npz_state if ext == "npz" else _bin_state)(out, store) == "old"
    _no_leftovers(tmp_path, out.name)


# ------------------------------------------------------------------ export --onnx
@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    """A trained run with two checkpoints, each alone under a checkpoint root; ``old`` and ``new``
    exports of them and the logits they serve on a batch."""
    pytest.importorskip("onnxruntime")
    from damo_hybrid.cli import main
    from damo_hybrid.data.synthetic import SyntheticCriteo
    from damo_hybrid.serving import Predictor

    root = tmp_path_factory.mktemp("onnx")
    assert main(["train", "--steps", "4", "--batch-size", "128", "--store", str(root / "s"), "--checkpoint-every", "2",
                 "--quiet", "--dim", "4", "--threads", "1"]) == 0
    for step in (2, 4):
        (root / f"ck{step}").mkdir()
        shutil.copytree(root / "s.ckpt" / f"step-{step}", root / f"ck{step}" / f"step-{step}")
    for name, step in (("old", 2), ("new", 4)):
        assert main(["export", "--store", str(root / "s"), "--checkpoint-dir", str(root / f"ck{step}"),
                     "--onnx", str(root / name)]) == 0
    b = SyntheticCriteo(128, seed=0).batch(1)
    want = {n: Predictor(root / n).predict(b.sparse, b.dense) for n in ("old", "new")}
    assert np.abs(want["old"] - want["new"]).max() > 1e-3
    return root, b, want


ONNX_POINTS = [(signal.SIGKILL, "numpy:save", 1), (signal.SIGKILL, "damo_hybrid.serving.onnx:onnx_export", 1),
               (signal.SIGKILL, "os:rename", 1), (signal.SIGKILL, "os:rename", 2), (signal.SIGKILL, "shutil:rmtree", 1),
               (signal.SIGINT, "damo_hybrid.serving.onnx:onnx_export", 1), (signal.SIGINT, "os:rename", 2),
               (signal.SIGTERM, "os:rename", 1)]


@pytest.mark.parametrize("sig, hook, nth", ONNX_POINTS, ids=[f"{s.name}-{h.split(':')[1]}-{n}" for s, h, n in ONNX_POINTS])
def test_a_reexport_interrupted_anywhere_serves_the_old_or_the_new_model(tmp_path, onnx_run, sig, hook, nth):
    from damo_hybrid.serving import Predictor

    root, b, want = onnx_run
    out = tmp_path / "serving"
    shutil.copytree(root / "old", out)
    code = _child(hook, nth, sig, "cli", "export", "--store", root / "s", "--checkpoint-dir", root / "ck4",
                  "--onnx", out)
    got = Predictor(out).predict(b.sparse, b.dense)  # a reader that finds the old copy set aside restores it
    state = next((n for n in ("old", "new") if np.allclose(got, want[n], atol=1e-6, rtol=0)), "a mix")
    assert state in ("old", "new"), f"served {state}: logits off by {np.abs(got - want['old']).max():.3f}"
    assert code == KILLED[sig], "the hook never fired"
    if sig != signal.SIGKILL:
        assert state == ("new" if hook == "shutil:rmtree" else "old")
        _no_leftovers(tmp_path, "serving")


# ------------------------------------------------------------------ compat.torch save_model
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``src``: a saved Tiny; ``ref``: what the child writes from it unarmed; logits of both."""
    import torch

    from damo_hybrid.compat.torch import REGISTRY, damo_embedding_init, load_model, save_model

    from ._write_model import Tiny

    root = tmp_path_factory.mktemp("saves")
    torch.manual_seed(0)
    model = Tiny()
    damo_embedding_init(model, root / "work", 0)
    model.train()
    model(torch.arange(1, 31).view(10, 3)).pow(2).mean().backward()
    save_model(model, root / "src")
    REGISTRY.reset()
    assert _child("", 0, signal.SIGKILL, "save-model", root / "src", root / "w-ref", root / "ref") == 0

    def logits(out: Path) -> np.ndarray:
        m = load_model(out, workdir=root / f"w-{os.urandom(4).hex()}")
        m.eval()
        with torch.no_grad():
            got = m(torch.arange(1, 31).view(10, 3)).numpy()
        REGISTRY.reset()
        return got

    want = {"old": logits(root / "src"), "new": logits(root / "ref")}
    assert np.abs(want["old"] - want["new"]).max() > 1e-3
    return root, logits, want


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_save_model_interrupted_at_every_rename_keeps_a_whole_save(tmp_path, saved, sig):
    root, logits, want = saved
    out = tmp_path / "out"

    def setup() -> None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(root / "src", out)
        shutil.rmtree(tmp_path / "w", ignore_errors=True)

    def check() -> str:
        got = logits(out)
        return next((n for n in ("old", "new") if np.array_equal(got, want[n])), "a mix")

    hooks = ("os:rename",) if sig == signal.SIGINT else RENAMES
    seen = _every_point(hooks, setup, lambda h, n: _child(h, n, sig, "save-model", root / "src", tmp_path / "w", out),
                        check, extra=(("torch:save", 2),) if sig == signal.SIGKILL else ())
    assert seen == {"old", "new"}


# ------------------------------------------------------------------ compat Damo and PyStorage
def _damo_rows(path: Path) -> np.ndarray:
    from damo_hybrid.compat import Damo

    from ._write_child import DAMO, KEYS

    with Damo({"dir": str(path), **DAMO}) as d:
        w = np.zeros((len(KEYS), 4), np.float32)
        d.pull(0, KEYS, w)
    return w


@pytest.fixture(scope="module")
def damo_files(tmp_path_factory):
    """A Damo store ``s`` with pushed rows, its checkpoint file ``old.bin``, and ``new.bin`` after
    one more push (the child's ``damo-checkpoint``); the rows of each."""
    from damo_hybrid.compat import Damo

    from ._write_child import DAMO, push

    root = tmp_path_factory.mktemp("damo")
    with Damo({"dir": str(root / "s"), **DAMO}) as d:
        push(d, 2.0)
        d.checkpoint(root / "old.bin")
    shutil.copytree(root / "s", root / "s2")
    assert _child("", 0, signal.SIGKILL, "damo-checkpoint", root / "s2", root / "new.bin") == 0
    rows = {"old": _damo_rows(root / "s"), "new": _damo_rows(root / "s2")}
    assert not np.array_equal(rows["old"], rows["new"])
    return root, rows


def _which(got: np.ndarray, rows: dict[str, np.ndarray]) -> str:
    if not got.any():
        return "fresh rows"
    return next((n for n in ("old", "new") if np.array_equal(got, rows[n])), "a mix")


def test_kill_9_inside_damo_checkpoint_leaves_the_old_or_the_new_file(tmp_path, damo_files):
    root, rows = damo_files
    out = tmp_path / "ck.bin"

    def setup() -> None:
        shutil.copy(root / "old.bin", out)
        shutil.rmtree(tmp_path / "s", ignore_errors=True)
        shutil.copytree(root / "s", tmp_path / "s")

    def check() -> str:
        shutil.rmtree(tmp_path / "r", ignore_errors=True)
        shutil.copytree(root / "s", tmp_path / "r")
        from damo_hybrid.compat import Damo

        from ._write_child import DAMO

        with Damo({"dir": str(tmp_path / "r"), **DAMO}) as d:
            d.load(out)
        return _which(_damo_rows(tmp_path / "r"), rows)

    seen = _every_point(RENAMES, setup, lambda h, n: _child(h, n, signal.SIGKILL, "damo-checkpoint", tmp_path / "s", out),
                        check, extra=(("tarfile:TarFile.addfile", 3),))
    assert seen == {"old", "new"}


@pytest.mark.parametrize("writer", ["damo-load", "pystorage-restore"])
def test_kill_9_inside_a_restore_leaves_the_old_or_the_new_store(tmp_path, damo_files, writer):
    root, rows = damo_files
    store = tmp_path / "s"
    if writer == "damo-load":
        src = root / "new.bin"
    else:  # the directory checkpoint inside new.bin
        with tarfile.open(root / "new.bin") as tar:
            tar.extractall(tmp_path / "x", filter="data")
        src = tmp_path / "x" / "checkpoint"

    def setup() -> None:
        shutil.rmtree(store, ignore_errors=True)
        for p in tmp_path.iterdir():
            if p.name.startswith(".s."):
                shutil.rmtree(p)
        shutil.copytree(root / "s", store)

    seen = _every_point(("os:rename", "shutil:rmtree"), setup,
                        lambda h, n: _child(h, n, signal.SIGKILL, writer, store, src),
                        lambda: _which(_damo_rows(store), rows))
    assert seen == {"old", "new"}


# ------------------------------------------------------------------ the store's meta files
def test_kill_9_while_the_store_writes_its_meta_files_loses_no_row(tmp_path):
    from damo_hybrid import AdmissionConfig

    from ._write_child import KEYS

    tables = [TableConfig("t", 4, optimizer=OptimizerConfig.sgd(0.5), admission=AdmissionConfig(min_count=1))]
    keys = KEYS.view(np.uint64) + np.uint64(1000)
    with EmbeddingStore(tmp_path / "base", tables) as s:  # rows, filters and counters to start from
        s.apply_gradients("t", keys[:10], np.ones((10, 4), np.float32))
    shutil.copytree(tmp_path / "base", tmp_path / "ref")
    assert _child("", 0, signal.SIGKILL, "close", tmp_path / "ref") == 0
    with EmbeddingStore(tmp_path / "ref", tables, read_only=True) as s:
        want = s.lookup("t", keys)

    def setup() -> None:
        shutil.rmtree(tmp_path / "s", ignore_errors=True)
        shutil.copytree(tmp_path / "base", tmp_path / "s")

    def check() -> str:
        with EmbeddingStore(tmp_path / "s", tables) as s:  # a writer reopens after the crash
            got = s.lookup("t", keys)
            assert s.stats().table_rows["t"] == len(keys)
        with EmbeddingStore(tmp_path / "s", tables, read_only=True) as s:  # and a reader after a clean close
            assert np.array_equal(s.lookup("t", keys), got)
        return "new" if np.array_equal(got, want) else "rows lost"

    seen = _every_point(("os:replace",), setup, lambda h, n: _child(h, n, signal.SIGKILL, "close", tmp_path / "s"),
                        check, extra=(("damo_hybrid.storage.keyfilter:StoredKeyFilter.save", 1),
                                      ("damo_hybrid.storage.files:fsync_dir", 2)))
    assert seen == {"new"}
