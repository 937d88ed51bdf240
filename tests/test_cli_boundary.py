"""The command line's one error boundary (issue 28, class 6).

Every expected failure is one line on stderr, ``damo-hybrid <cmd>: error: ...``, naming the file
and the cause in under 300 characters, with the documented exit status (2: bad input or a
refusal, 3: the system refused); only a bug prints a traceback, then asks to be reported (70).
Full disks are a 1 MiB tmpfs filled to the last byte, read-only media a tmpfs remounted ``ro``
(skipped where mounting is not permitted).
"""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
from _tmpfs import fill, remount_read_only, tmpfs

from damo_hybrid import EmbeddingStore, TableConfig
from damo_hybrid.cli import main
from damo_hybrid.errors import DamoHybridError

TRAIN = ["train", "--quiet", "--steps", "2", "--batch-size", "64", "--dim", "4", "--vocab-min", "100",
         "--vocab-max", "1000", "--cache-mb", "1"]


def _store(path) -> None:
    k = np.arange(1, 2001, dtype=np.uint64)
    with EmbeddingStore(path, [TableConfig("a", 8)]) as s:
        s.apply_gradients("a", k, np.ones((len(k), 8), np.float32))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    assert main([*TRAIN, "--store", str(d / "st"), "--checkpoint-every", "2"]) == 0
    return d


def _fails(capsys, args: list[str], status: int, *named: str) -> str:
    """Run the command; check its status and its one error line, which names each of ``named``."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("damo-hybrid")]
    assert len(lines) == 1, err
    line = lines[0]
    assert rc == status, line
    assert line.startswith(f"damo-hybrid {args[0]}: error: "), line
    assert len(line) < 300, line
    for n in named:
        assert n in line, line
    return line


# ------------------------------------------------------------------ the eight cases of the issue
@pytest.mark.parametrize("cmd", [["export", "--out", "{full}/w.npz"], ["dump", "--out", "{full}/d.npz"],
                                 ["dump", "--out", "{full}/d.bin", "--format", "seed"]])
def test_a_full_disk_during_export_or_dump(tmp_path, capsys, cmd):
    _store(tmp_path / "s")
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full)
        args = [cmd[0], "--store", tmp_path / "s", *[a.format(full=full) for a in cmd[1:]]]
        _fails(capsys, args, 3, str(full / cmd[2].split("/")[-1]), "No space left on device")
        assert sorted(p.name for p in full.iterdir()) == ["ballast"]  # no temp file left behind


def test_a_full_disk_during_onnx_export(trained, tmp_path, capsys):
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full)
        _fails(capsys, ["export", "--store", trained / "st", "--onnx", full / "onnx"], 3, str(full),
               "No space left on device")


@pytest.mark.parametrize("cmd", [TRAIN, ["demo", "--steps", "1", "--batch-size", "16"]])
def test_a_new_store_on_a_read_only_file_system(tmp_path, capsys, cmd):
    with tmpfs(tmp_path / "ro") as ro:
        remount_read_only(ro)
        _fails(capsys, [*cmd, "--store", ro / "new"], 3, str(ro / "new"), "Read-only file system")


DAMAGED_META = [
    '{"format": 1, "tables"',  # cut short
    "[1, 2]",  # not an object
    '{"format": 1}',  # no tables
    '{"format": 1, "next_table_id": 2, "tables": {"a": {"id": 1}}}',  # an entry without its config
    '{"format": 1, "next_table_id": 2, "tables": {"a": {"id": 1, "step": 0, "rows": 0, "config": {"dim": "x"}}}}',
    '{"format": 1, "next_table_id": "two", "tables": {}}',
    "\x00\xff\xfe binary",
]


@pytest.mark.parametrize("text", DAMAGED_META, ids=range(len(DAMAGED_META)))
@pytest.mark.parametrize("cmd", ["inspect", "export", "dump", "train"])
def test_a_damaged_meta_json_in_a_store(tmp_path, capsys, text, cmd):
    _store(tmp_path / "s")
    (tmp_path / "s" / "meta.json").write_bytes(text.encode("latin-1"))
    args = {"inspect": ["inspect", "--store", tmp_path / "s"],
            "export": ["export", "--store", tmp_path / "s", "--out", tmp_path / "w.npz"],
            "dump": ["dump", "--store", tmp_path / "s", "--out", tmp_path / "d.npz"],
            "train": [*TRAIN, "--store", tmp_path / "s"]}[cmd]
    _fails(capsys, args, 2, str(tmp_path / "s" / "meta.json"))


@pytest.mark.parametrize("text", DAMAGED_META, ids=range(len(DAMAGED_META)))
def test_a_damaged_meta_json_read_from_python_is_one_typed_line(tmp_path, text):
    _store(tmp_path / "s")
    (tmp_path / "s" / "meta.json").write_bytes(text.encode("latin-1"))
    for ro in (True, False):
        with pytest.raises(DamoHybridError) as e:
            EmbeddingStore(tmp_path / "s", read_only=ro)
        assert "meta.json" in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_a_damaged_meta_json_in_a_checkpoint(trained, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    for meta in (root / "st.ckpt").glob("step-*/store/meta.json"):
        meta.write_text('{"format": 1, "tables": [')
    _fails(capsys, ["export", "--store", root / "st", "--onnx", tmp_path / "onnx"], 2, str(root / "st.ckpt"))
    ck = next((root / "st.ckpt").glob("step-*"))
    with pytest.raises(DamoHybridError, match="meta.json"):
        EmbeddingStore.from_checkpoint(ck / "store", tmp_path / "restored")
    _fails(capsys, [*TRAIN, "--store", root / "st", "--checkpoint-every", "2", "--resume"], 2, str(root / "st.ckpt"))


def _cut_tables(s):
    for f in (s / "db").glob("*.sst"):
        f.write_bytes(f.read_bytes()[:100])


def _wrong_counters(s):
    np.save(s / "admission" / "1.npy", np.zeros(7, np.float64))


@pytest.mark.parametrize("damage, named", [
    (lambda s: (s / "db" / "CURRENT").unlink(), "db"),
    (_cut_tables, "db/0"),  # the store's own file, not the reader's private links to it
    (lambda s: (s / "shard.json").write_text("{"), "shard.json"),
    (lambda s: (s / "admission" / "1.npy").write_text("garbage"), "1.npy"),
    (_wrong_counters, "1.npy"),
], ids=["no CURRENT", "cut tables", "shard record", "counters unreadable", "counters of another size"])
def test_other_damaged_store_files(tmp_path, capsys, damage, named):
    from damo_hybrid import AdmissionConfig

    k = np.arange(1, 2001, dtype=np.uint64)
    with EmbeddingStore(tmp_path / "s", [TableConfig("a", 8, admission=AdmissionConfig(min_count=1, capacity=1000))]) as s:
        s.apply_gradients("a", k, np.ones((len(k), 8), np.float32))
    damage(tmp_path / "s")
    for cmd in (["inspect", "--store", tmp_path / "s"], [*TRAIN, "--store", tmp_path / "s"]):
        if cmd[0] == "inspect" and named == "shard.json":
            continue  # a reader does not claim a shard
        line = _fails(capsys, cmd, 2, named)
        assert "damo-read-" not in line


def test_a_too_small_cache_without_prefetch(tmp_path, capsys):
    line = _fails(capsys, ["train", "--quiet", "--steps", "1", "--batch-size", "8192", "--dim", "2", "--cache-mb", "1",
                           "--no-prefetch"], 2, "cannot free")
    assert "--cache-mb" in line or "cache budget" in line


# ------------------------------------------------------------------ the boundary itself
def _raising(monkeypatch, exc: BaseException) -> None:
    """``inspect`` raises ``exc`` (the parser reads ``stores.inspect`` when it is built)."""
    from damo_hybrid.cli import stores

    def boom(args):
        raise exc

    monkeypatch.setattr(stores, "inspect", boom)


@pytest.mark.parametrize("exc, status, named", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/out.npz"), 3, "/x/out.npz: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/x/s"), 3, "/x/s: Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/s/meta.json"), 3, "/x/s/meta.json: Permission denied"),
    (OSError(errno.EMFILE, "Too many open files"), 3, "ulimit -n"),
    (OSError(errno.EIO, "Input/output error", "/x/s/db/000009.sst"), 3, "000009.sst: Input/output error"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"), 2, "/x/y: No such file or directory"),
    (MemoryError(), 3, "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 99999999999 bytes"), 3, "--batch-size"),
    (DamoHybridError("RocksDB failed to open store '/x/s/db': Read-only file system (os error 30)"), 3,
     "Read-only file system"),
    (DamoHybridError("store metadata /x/s/meta.json is damaged"), 2, "/x/s/meta.json is damaged"),
    (ValueError("--fractions must lie in (0, 1], got -1"), 2, "--fractions"),
    (ModuleNotFoundError("No module named 'pyarrow'"), 2, "pyarrow"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/.w.npz.0123456789abcdef0123456789abcdef.tmp"), 3,
     "/x/w.npz: No space"),
])
def test_expected_failures_are_one_line_with_their_status(monkeypatch, capsys, exc, status, named):
    _raising(monkeypatch, exc)
    _fails(capsys, ["inspect", "--store", "anything"], status, named)


def test_a_wrapped_system_refusal_keeps_its_status(monkeypatch, capsys):
    from damo_hybrid.errors import PipelineError

    try:
        try:
            raise MemoryError()
        except MemoryError as e:
            raise PipelineError("the host manager stage failed: MemoryError()") from e
    except PipelineError as e:
        wrapped = e
    _raising(monkeypatch, wrapped)
    _fails(capsys, ["inspect", "--store", "anything"], 3, "host manager")


@pytest.mark.parametrize("exc", [KeyError("slot"), IndexError("index 3 is out of bounds"),
                                 ImportError("cannot import name 'X' from 'damo_hybrid.errors'", name="damo_hybrid.errors"),
                                 RuntimeError("an invariant broke")], ids=lambda e: type(e).__name__)
def test_a_bug_shows_its_traceback_and_asks_to_be_reported(monkeypatch, capsys, exc):
    _raising(monkeypatch, exc)
    assert main(["inspect", "--store", "anything"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"damo-hybrid inspect: error: internal error ({type(exc).__name__}") and "report" in last
    assert len(last) < 300


def test_a_stage_failing_on_a_bug_is_a_bug(monkeypatch, capsys):
    from damo_hybrid.errors import PipelineError

    try:
        try:
            [][1]
        except IndexError as e:
            raise PipelineError("the prepare stage failed: IndexError") from e
    except PipelineError as e:
        wrapped = e
    _raising(monkeypatch, wrapped)
    assert main(["inspect", "--store", "anything"]) == 70
    assert "Traceback" in capsys.readouterr().err


def test_the_exit_statuses_are_documented():
    from pathlib import Path

    from damo_hybrid.cli import failure

    docs = Path(__file__).resolve().parents[1] / "docs"
    for page in ("cli.md", "troubleshooting.md"):
        text = (docs / page).read_text()
        assert "Exit status" in text, page
        for status in (failure.OK, failure.CHECK_FAILED, failure.REFUSED, failure.SYSTEM, failure.BUG,
                       failure.SIGINT, failure.SIGTERM):
            assert f"| {status} |" in text, (page, status)


def test_meta_json_written_by_a_store_still_reads(tmp_path):
    _store(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["tables"]["a"]["rows"] == 2000
    with EmbeddingStore(tmp_path / "s", read_only=True) as r:
        assert r.stats().table_rows == {"a": 2000}
