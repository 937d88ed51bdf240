"""What only the on-disk store can show: persistence, locking, corruption, checkpoints, TTL."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rocksdict

from damo_hybrid import (
    AdmissionConfig,
    EmbeddingStore,
    InitializerConfig,
    OptimizerConfig,
    StoreConfig,
    TableConfig,
)
from damo_hybrid.errors import (
    ConfigConflictError,
    CorruptRowError,
    DamoHybridError,
    OutOfSpaceError,
    StoreLockedError,
)
from damo_hybrid.storage.backend import encode_keys

T = TableConfig("emb", 4, initializer=InitializerConfig.normal(std=0.1), optimizer=OptimizerConfig.adagrad(0.1))
KEYS = np.array([3, 2**63 + 5, 2**64 - 1], np.uint64)
G = np.ones((3, 4), np.float32)


def test_rows_steps_and_counts_persist_across_reopen(tmp_path):
    adm = TableConfig("adm", 2, admission=AdmissionConfig(min_count=2, capacity=1000))
    with EmbeddingStore(tmp_path / "s", [T, adm]) as s:
        s.apply_gradients("emb", KEYS, G)
        s.apply_gradients("emb", KEYS, G)
        s.apply_gradients("adm", KEYS[:1], np.ones((1, 2), np.float32))  # seen once, not admitted
        w = s.lookup("emb", KEYS)
    with EmbeddingStore(tmp_path / "s") as s:  # configs come back from the store
        np.testing.assert_array_equal(s.lookup("emb", KEYS), w)
        assert s.step("emb") == 2 and s.stats().table_rows == {"emb": 3, "adm": 0}
        assert s.tables["emb"] == T
        s.apply_gradients("adm", KEYS[:1], np.ones((1, 2), np.float32))  # second sighting admits
        assert s.count_rows("adm") == 1


def test_second_handle_in_process_is_locked(tmp_path):
    with EmbeddingStore(tmp_path / "s", [T]):
        with pytest.raises(StoreLockedError, match="locked"):
            EmbeddingStore(tmp_path / "s", [T])


def test_second_process_gets_locked_error(tmp_path):
    code = (
        "import sys\n"
        "from damo_hybrid import EmbeddingStore\n"
        "from damo_hybrid.errors import StoreLockedError\n"
        "try:\n    EmbeddingStore(sys.argv[1])\nexcept StoreLockedError as e:\n    print('LOCKED', e); sys.exit(3)\n"
    )
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True)
        assert r.returncode == 3, r.stderr
        assert "LOCKED" in r.stdout and "another process" in r.stdout
        w = s.lookup("emb", KEYS)
    with EmbeddingStore(tmp_path / "s") as s:  # and nothing was lost
        np.testing.assert_array_equal(s.lookup("emb", KEYS), w)


def test_read_only_handle_reads_while_writer_holds_lock(tmp_path):
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
        s.flush()
        with EmbeddingStore(tmp_path / "s", read_only=True) as r:
            np.testing.assert_array_equal(r.lookup("emb", KEYS), s.lookup("emb", KEYS))
            with pytest.raises(DamoHybridError, match="read_only"):
                r.apply_gradients("emb", KEYS, G)


@pytest.mark.parametrize(
    "other, match",
    [
        (TableConfig("emb", 8, optimizer=OptimizerConfig.adagrad(0.1)), "dim=4"),
        (TableConfig("emb", 4, optimizer=OptimizerConfig.adam(0.1)), "optimizer 'adagrad'"),
    ],
)
def test_conflicting_config_is_refused(tmp_path, other, match):
    EmbeddingStore(tmp_path / "s", [T]).close()
    with pytest.raises(ConfigConflictError, match=match):
        EmbeddingStore(tmp_path / "s", [other])
    # and the store still opens with its own config afterwards
    EmbeddingStore(tmp_path / "s", [T]).close()


def test_a_changed_config_raises_unless_allowed_and_then_is_logged(tmp_path, caplog):
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
    changed = TableConfig("emb", 4, initializer=InitializerConfig.zeros(), optimizer=OptimizerConfig.adagrad(0.5))
    with pytest.raises(ConfigConflictError, match=r"optimizer\.lr: 0\.1 -> 0\.5.*allow_config_change"):
        EmbeddingStore(tmp_path / "s", [changed])
    with EmbeddingStore(tmp_path / "s") as s:  # the refused open changed nothing
        assert s.tables["emb"] == T
        with pytest.raises(ConfigConflictError, match="initializer.kind: 'normal' -> 'zeros'"):
            s.add_table(changed)
        s.add_table(T)  # the same config is no change
    with caplog.at_level("WARNING"), EmbeddingStore(tmp_path / "s", [changed],
                                                    StoreConfig(allow_config_change=True)) as s:
        assert s.tables["emb"].optimizer.lr == 0.5
    assert "optimizer.lr: 0.1 -> 0.5" in caplog.text
    with EmbeddingStore(tmp_path / "s") as s:
        assert s.tables["emb"].optimizer.lr == 0.5
    with pytest.raises(ConfigConflictError, match="dim=4, opened with dim=8"):  # never allowed
        EmbeddingStore(tmp_path / "s", [TableConfig("emb", 8)], StoreConfig(allow_config_change=True))


def _poke(path: Path, table_id: int, key: int, fn) -> None:
    db = rocksdict.Rdict(str(path / "db"), rocksdict.Options(raw_mode=True))
    k = encode_keys(table_id, np.array([key], np.uint64))[0]
    db[k] = fn(db[k])
    db.close()


@pytest.mark.parametrize(
    "mangle, reason",
    [
        (lambda v: v[:10] + bytes([v[10] ^ 0x01]) + v[11:], "checksum"),
        (lambda v: v[:-3], "bytes, expected"),
        (lambda v: v + b"\x00", "bytes, expected"),
        (lambda v: bytes([7]) + v[1:], "layout version"),
    ],
    ids=["flipped_bit", "truncated", "extended", "version"],
)
def test_corrupt_value_is_detected_with_table_and_key(tmp_path, mangle, reason):
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
        good = s.lookup("emb", KEYS[:2])
    _poke(tmp_path / "s", 1, 2**64 - 1, mangle)
    with EmbeddingStore(tmp_path / "s") as s:
        with pytest.raises(CorruptRowError, match=f"'emb' at key {2**64 - 1}.*{reason}"):
            s.lookup("emb", KEYS)
        with pytest.raises(CorruptRowError):
            s.apply_gradients("emb", KEYS, G)
        np.testing.assert_array_equal(s.lookup("emb", KEYS[:2]), good)  # other rows unharmed
        s.delete("emb", KEYS[2:])  # the documented way out
        s.lookup("emb", KEYS)


def test_value_moved_to_another_key_is_detected(tmp_path):
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
    db = rocksdict.Rdict(str(tmp_path / "s" / "db"), rocksdict.Options(raw_mode=True))
    a, b = encode_keys(1, KEYS[:2])
    db[b] = db[a]
    db.close()
    with EmbeddingStore(tmp_path / "s") as s, pytest.raises(CorruptRowError, match="checksum"):
        s.lookup("emb", KEYS[1:2])


def test_checkpoint_is_a_consistent_snapshot_and_restores(tmp_path):
    adm = TableConfig("adm", 2, admission=AdmissionConfig(min_count=2, capacity=1000))
    with EmbeddingStore(tmp_path / "s", [T, adm]) as s:
        s.apply_gradients("emb", KEYS, G)
        s.apply_gradients("adm", KEYS[:1], np.ones((1, 2), np.float32))
        at_ckpt = s.lookup("emb", KEYS)
        s.checkpoint(tmp_path / "ck")
        s.apply_gradients("emb", KEYS, G)  # after the checkpoint: not in it
        assert not np.array_equal(s.lookup("emb", KEYS), at_ckpt)
    for target in ("r1", "r2"):  # restorable more than once: the checkpoint is never modified
        with EmbeddingStore.from_checkpoint(tmp_path / "ck", tmp_path / target) as r:
            np.testing.assert_array_equal(r.lookup("emb", KEYS), at_ckpt)
            assert r.step("emb") == 1
            r.apply_gradients("adm", KEYS[:1], np.ones((1, 2), np.float32))  # counter state came along
            assert r.count_rows("adm") == 1


def test_interrupted_checkpoint_is_never_picked_up(tmp_path, monkeypatch):
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)

        def boom(*a, **k):
            raise OSError("simulated crash while writing the checkpoint")

        monkeypatch.setattr("damo_hybrid.storage.checkpoint.fsync_tree", boom)
        with pytest.raises(OSError, match="simulated"):
            s.checkpoint(tmp_path / "ck")
        assert not (tmp_path / "ck").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck")]
        monkeypatch.undo()
        s.checkpoint(tmp_path / "ck")  # a later checkpoint succeeds
        with pytest.raises(FileExistsError):
            s.checkpoint(tmp_path / "ck")
    # a directory left by a kill mid-checkpoint has no marker and is refused
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "meta.json").write_text("{}")
    with pytest.raises(DamoHybridError, match="not a complete checkpoint"):
        EmbeddingStore.from_checkpoint(partial, tmp_path / "r")


def test_a_failed_restore_leaves_its_target_reusable(tmp_path):
    from damo_hybrid.errors import ConfigConflictError

    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
        want = s.lookup("emb", KEYS)
        s.checkpoint(tmp_path / "ck")
    wrong = TableConfig("emb", T.dim + 1)
    with pytest.raises(ConfigConflictError):
        EmbeddingStore.from_checkpoint(tmp_path / "ck", tmp_path / "r", [wrong])
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    with EmbeddingStore.from_checkpoint(tmp_path / "ck", tmp_path / "r", [T]) as r:  # was: "not empty"
        np.testing.assert_array_equal(r.lookup("emb", KEYS), want)
    # a checkpoint whose registry went missing says so, instead of "no CHECKPOINT.json"
    (tmp_path / "ck" / "meta.json").unlink()
    with pytest.raises(DamoHybridError, match="has no meta.json"):
        EmbeddingStore.from_checkpoint(tmp_path / "ck", tmp_path / "r2")


def test_out_of_space_is_reported_and_loses_nothing(tmp_path):
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
        before = s.lookup("emb", KEYS)
        real = s._storage._db  # type: ignore[attr-defined]

        class FullDisk:
            def __getattr__(self, name):
                return getattr(real, name)

            def write(self, *a, **k):
                raise Exception("IO error: No space left on device: While appending to file: 000012.log")

        s._storage._db = FullDisk()  # type: ignore[attr-defined]
        with pytest.raises(OutOfSpaceError, match="disk full"):
            s.apply_gradients("emb", KEYS, G)
        s._storage._db = real  # type: ignore[attr-defined]
        np.testing.assert_array_equal(s.lookup("emb", KEYS), before)
        assert s.step("emb") == 1


def test_ttl_mode_expires_rows_and_must_be_reopened_with_ttl(tmp_path):
    cfg = StoreConfig(ttl_seconds=1)
    with EmbeddingStore(tmp_path / "s", [T], cfg) as s:
        s.apply_gradients("emb", KEYS, G)
        assert s.count_rows("emb") == 3
        time.sleep(2.2)
        s.flush()
        s.compact()
        assert s.count_rows("emb") == 0
    with pytest.raises(ConfigConflictError, match="TTL"):
        EmbeddingStore(tmp_path / "s", [T])
    EmbeddingStore(tmp_path / "s", [T], StoreConfig(ttl_seconds=3600)).close()


def test_store_meta_is_written_atomically(tmp_path):
    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
        s.flush()
    leftovers = [p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    (tmp_path / "s" / "meta.json").write_text("{not json")
    with pytest.raises(DamoHybridError, match="unreadable"):
        EmbeddingStore(tmp_path / "s")


def test_a_storage_fault_during_a_scan_is_a_typed_error_naming_the_table(tmp_path, monkeypatch):
    from damo_hybrid.errors import CorruptRowError
    from damo_hybrid.storage.backend import encode_keys

    with EmbeddingStore(tmp_path / "s", [T]) as s:
        s.apply_gradients("emb", KEYS, G)
        real = s._storage.scan  # type: ignore[attr-defined]

        def damaged(table_id, batch=65536):
            it = real(table_id, batch=1)
            yield next(it)
            raise Exception("Corruption: block checksum mismatch")  # what rocksdict raises

        monkeypatch.setattr(s._storage, "scan", damaged)  # type: ignore[attr-defined]
        with pytest.raises(CorruptRowError, match=r"table 'emb' at key 3 .*cannot read past") as ei:
            list(s.scan("emb"))
        assert ei.value.table == "emb" and ei.value.key == 3
        monkeypatch.undo()
        # a stored key of the wrong length inside the table's range is named too
        s._storage.db[encode_keys(1, KEYS[:1])[0][:4] + b"xx"] = b"x"  # type: ignore[attr-defined]
        with pytest.raises(CorruptRowError, match="table 'emb'"):
            s.count_rows("emb")


def test_row_counts_are_exact_after_a_crash_and_on_a_live_store(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "s"
    code = textwrap.dedent(f"""
        import os, numpy as np
        from damo_hybrid import EmbeddingStore, TableConfig
        s = EmbeddingStore({str(path)!r}, [TableConfig("emb", 4)])
        s.apply_gradients("emb", np.arange(10, dtype=np.uint64), np.ones((10, 4), np.float32))
        s.flush()  # meta.json says 10 rows
        s.apply_gradients("emb", np.arange(10, 15, dtype=np.uint64), np.ones((5, 4), np.float32))
        print("ready", flush=True)
        if os.environ.get("CRASH"):
            os._exit(0)  # no close: the count of 15 is only in RocksDB
        import sys; sys.stdin.read()  # stay open (a live store) until the test is done
    """)
    live = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "ready"
        with EmbeddingStore(path, read_only=True) as s:  # inspect of a live store: 15, not 10
            assert s.stats().table_rows["emb"] == 15
    finally:
        live.communicate("", timeout=60)
    crash = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "CRASH": "1"})
    assert crash.returncode == 0, crash.stderr
    with EmbeddingStore(path) as s:  # after the crash: recounted
        assert s.stats().table_rows["emb"] == s.count_rows("emb") == 15
        s.apply_gradients("emb", np.arange(15, 17, dtype=np.uint64), np.ones((2, 4), np.float32))
    with EmbeddingStore(path) as s:  # and exact from then on, after a clean close
        assert s.stats().table_rows["emb"] == 17


def test_a_reopened_store_keeps_its_rocksdb_options(tmp_path):
    """rocksdict gave the column family of an existing database its own defaults: a reopened store
    had no bloom filter (every lookup of a missing key read a data block per level, ~10x the
    time), an 8 MiB block cache and compressed blocks. Any store a second run opens was hit."""
    import glob

    from damo_hybrid.config import StoreConfig
    from damo_hybrid.storage.rocksdb import RocksDBStorage

    cfg = StoreConfig(block_cache_mb=64)
    for _ in range(2):  # created, then reopened
        st = RocksDBStorage(str(tmp_path / "db"), cfg)
        st.put(0, np.arange(10, dtype=np.uint64), [bytes(8)] * 10)
        assert st.db.property_int_value("rocksdb.block-cache-capacity") == 64 << 20
        st.db.close()
    effective = open(sorted(glob.glob(str(tmp_path / "db" / "OPTIONS-*")))[-1]).read()  # written on open
    default_cf = effective.split('[CFOptions "default"]')[1]
    assert "filter_policy=bloomfilter" in default_cf and "compression=kNoCompression" in default_cf
