"""Real small and read-only file systems for tests: a tmpfs mounted on a test's folder.

Mounting needs root (or CAP_SYS_ADMIN); where it is not permitted the test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@contextmanager
def tmpfs(path: Path, size: str = "64m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (created), unmounted at the end; skips the test
    where mounting is not permitted."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    r = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        if _run("umount", str(path)).returncode != 0:
            _run("umount", "-l", str(path))


def remount_read_only(path: Path) -> None:
    r = _run("mount", "-o", "remount,ro", str(path))
    if r.returncode != 0:
        pytest.skip(f"cannot remount {path.name} read-only: {r.stderr.strip()[:200]}")


def fill(mnt: Path) -> None:
    """Fill the file system at ``mnt`` to the last byte (a ballast file)."""
    fd = os.open(mnt / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 10, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``root``: relative path -> (size, mtime in ns, SHA-256 of a
    file; a folder's mtime changes when an entry is added, removed or renamed in it)."""
    import hashlib

    out = {}
    for dirpath, dirs, files in os.walk(root):
        out[Path(dirpath).relative_to(root).as_posix() + "/"] = (0, Path(dirpath).stat().st_mtime_ns, "dir")
        for n in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / n
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, digest)
    return out
