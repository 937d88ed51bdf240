"""A real full disk: a small tmpfs the test mounts in a private mount namespace (``unshare``).

The worker fills the disk until a write fails, and checks that the failure is a clear
``OutOfSpaceError``, that the store still opens read-only on the full disk, and, once space is
freed, opens for writing with every row written before the fault."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    from damo_hybrid import EmbeddingStore, TableConfig, OptimizerConfig
    from damo_hybrid.errors import OutOfSpaceError

    mnt, report = sys.argv[1], sys.argv[2]
    tables = [TableConfig("t", 16, optimizer=OptimizerConfig.adagrad(0.1))]
    base = np.arange(1000, dtype=np.uint64)
    out = {}
    with EmbeddingStore(f"{mnt}/store", tables) as s:
        s.apply_gradients("t", base, np.ones((1000, 16), np.float32))
        s.flush()
        before = s.lookup("t", base)
    ballast = f"{mnt}/ballast"
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(ballast, "wb") as f:
        f.write(b"\\0" * int(free - (3 << 20)))  # leave about 3 MiB
    s = EmbeddingStore(f"{mnt}/store", tables)
    acked = 0
    try:
        for i in range(10_000):
            k = np.arange(10**6 + i * 5000, 10**6 + (i + 1) * 5000, dtype=np.uint64)
            s.apply_gradients("t", k, np.ones((5000, 16), np.float32))
            s.flush()
            acked = (i + 1) * 5000
        out["error"] = None
    except OutOfSpaceError as e:
        out["error"], out["message"] = "OutOfSpaceError", str(e)
    except Exception as e:
        out["error"], out["message"] = type(e).__name__, str(e)
    try:
        s.close()  # its flush hits the full disk too: the same clear error, and the lock is released
    except Exception as e:
        out["close_error"] = type(e).__name__
    with EmbeddingStore(f"{mnt}/store", read_only=True) as r:  # still readable on the full disk
        out["read_only_same"] = bool(np.array_equal(r.lookup("t", base), before))
    os.remove(ballast)
    with EmbeddingStore(f"{mnt}/store", tables) as w:
        out["same"] = bool(np.array_equal(w.lookup("t", base), before))
        out["rows"] = w.count_rows("t")  # every row decodes (checksums checked)
        out["acked"] = acked
        w.apply_gradients("t", base, np.ones((1000, 16), np.float32))  # writable again
    json.dump(out, open(report, "w"))
''')


def _namespace_prefix() -> list[str] | None:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return None
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                                                  "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_full_disk_is_a_clear_error_and_loses_nothing(tmp_path):
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs here (needs unshare and mount namespaces)")
    mnt, report, worker = tmp_path / "mnt", tmp_path / "report.json", tmp_path / "worker.py"
    mnt.mkdir()
    worker.write_text(WORKER)
    script = 'mount -t tmpfs -o size=32m tmpfs "$1" && exec "$2" "$3" "$1" "$4"'
    r = subprocess.run([*prefix, "sh", "-c", script, "_", str(mnt), sys.executable, str(worker), str(report)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(report.read_text())
    assert out["error"] == "OutOfSpaceError", out
    assert "disk full" in out["message"] and "Free disk space" in out["message"]
    assert out.get("close_error") in (None, "OutOfSpaceError"), out
    assert out["read_only_same"] and out["same"]
    assert out["rows"] >= 1000 + out["acked"]  # nothing acknowledged before the fault was lost
