"""Crash-safe writes: a reader sees the old output or the complete new one, never half, never a mix.

A file (:func:`atomic_file`) is written to a hidden temp file beside it, fsynced and renamed into
place. A folder (:func:`atomic_dir`) is built in a hidden sibling, gets a manifest
(:data:`MANIFEST`: an id and each file's size and SHA-256) written last, and is swapped in: the
old folder is renamed aside (:func:`aside_path`), the new one renamed in, the old one deleted.
At every instant the destination holds the complete old or the complete new folder, or, between
the two renames, is missing while the aside copy is whole; :func:`recover_dir`, which every
reader calls first, renames that copy back. Readers check the manifest with
:func:`verify_manifest` (and :func:`read_whole` loads again when a writer swapped the folder
meanwhile). What a killed writer leaves (hidden temp files and folders named with its process
id) is removed by the next write beside it.

One writer at a time per destination; any number of readers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from ..errors import DamagedOutputError

__all__ = ["atomic_file", "fsync_dir", "make_dir", "atomic_dir", "swap_dir", "aside_path", "recover_dir",
           "check_replaceable", "scratch_dir", "write_manifest", "verify_manifest", "read_whole",
           "remove_leftovers", "removed_on_failure", "DamagedOutputError", "MANIFEST", "list_files", "check_files",
           "fsync_tree"]

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20
T = TypeVar("T")


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename inside it, a new file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path`` through a hidden temp file that is fsynced and renamed into place.

    On an exception the temp file is removed and ``path`` is untouched.
    """
    out = Path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # the pid: see remove_leftovers
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    remove_leftovers(out.parent, re.escape(f".{out.name}.") + r"(\d+)\.[0-9a-f]+\.tmp")


def make_dir(path: Path) -> None:
    """``mkdir -p path``, its new entry persisted (the parent fsynced) where it was created."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    fsync_dir(path.parent)


@contextmanager
def removed_on_failure(path: Path | None, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run the block; if it raises, remove the folders it created at ``path``: the first of
    ``path`` and its ancestors that was missing before the block, with all in it. What was there
    before is left. ``keep``: exceptions that leave everything (another writer won the folder);
    ``path`` None: nothing to watch.

    A store opened on a full disk or beside a read-only one leaves no empty folder behind.
    """
    made = None
    if path is not None:
        for p in (path, *path.parents):
            if os.path.lexists(p):
                break
            made = p
    try:
        yield
    except BaseException as e:
        if made is not None and not isinstance(e, keep):
            _remove(made)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_leftovers(parent: Path, pattern: str) -> None:
    """Delete the entries of ``parent`` whose whole name matches ``pattern`` and whose first
    group, a process id, names a process that no longer runs (what a killed writer left)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    rx = re.compile(pattern)
    for name in names:
        m = rx.fullmatch(name)
        if m is None or _alive(int(m.group(1))):
            continue
        p = parent / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            pass


def _leftover_dirs(dst: Path, kind: str) -> str:
    return re.escape(f".{dst.name}.{kind}-") + r"(\d+)-[0-9a-f]+"


def _remove(p: Path) -> None:
    """Delete a folder, file or link (a link, not what it points to); what cannot be is left."""
    try:
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass


def aside_path(dst: Path) -> Path:
    """Where :func:`swap_dir` keeps the old folder between its two renames: ``.<name>.old``."""
    return dst.with_name(f".{dst.name}.old")


def _article(what: str) -> str:
    return ("an " if what[:1].lower() in "aeiou" else "a ") + what


def check_replaceable(dst: Path, markers: Sequence[str], what: str) -> None:
    """Refuse to replace ``dst`` unless it is absent, an empty folder, or a folder holding
    :data:`MANIFEST` or one of ``markers`` (an output of this kind); no markers: any folder.

    Raises:
        ValueError: ``dst`` is a file, or a folder of something else (one line).
    """
    if not os.path.lexists(dst):
        return
    if not dst.is_dir():
        raise ValueError(f"{dst} exists and is not a folder: give a new or empty folder for the {what}")
    if not markers:
        return
    names = set(os.listdir(dst))
    if names and MANIFEST not in names and not names & set(markers):
        raise ValueError(f"{dst} exists and is not {_article(what)} (no {markers[0]}): give a new or empty "
                         "folder; nothing was written")


def recover_dir(path: str | os.PathLike[str], *, repair: bool = True) -> Path:
    """The folder to read at ``path``, after finishing what an interrupted :func:`swap_dir` left.

    Where the destination is missing and its aside copy (the complete old folder) is there, the
    swap was cut between its two renames: the copy is renamed back (or, where it cannot be, on
    read-only media, returned to be read where it is). Where both are there, the swap had
    finished: the aside copy is deleted (if it can be), unless the destination is an empty folder
    made after the kill, which gives way to the copy.

    Args:
        path: the destination folder.
        repair: False for a reader that must write nothing (a read-only store open): the aside
            copy is returned to be read where it is, and nothing is renamed or deleted.
    """
    dst = Path(path)
    aside = aside_path(dst)
    if not os.path.lexists(aside):
        return dst
    if os.path.lexists(dst) and not _empty_dir(dst):
        if repair:
            _remove(aside)
        return dst
    if not repair:
        return aside
    if os.path.lexists(dst):  # an empty folder made after the kill (an open that found nothing): no copy
        try:
            os.rmdir(dst)
        except OSError:
            return aside
    try:
        os.rename(aside, dst)
        fsync_dir(dst.parent)
    except OSError:
        return dst if os.path.lexists(dst) else aside  # restored by another reader, or read-only
    log.warning("%s: restored the complete previous version, set aside by an interrupted write", dst)
    return dst


def _empty_dir(p: Path) -> bool:
    try:
        return p.is_dir() and not p.is_symlink() and not any(p.iterdir())
    except OSError:
        return False


def swap_dir(build: Path, dst: Path) -> None:
    """Replace the folder ``dst`` by the complete folder ``build`` (a sibling): the old one
    renamed aside, the new one renamed in, the old one deleted. Interrupted (an exception, Ctrl-C)
    between the renames, the old one is put back; killed there, :func:`recover_dir` puts it back."""
    aside = aside_path(dst)
    for attempt in range(3):
        try:
            if os.path.lexists(dst):
                os.rename(dst, aside)
            os.rename(build, dst)
            break
        except BaseException as e:
            if os.path.lexists(dst) and not os.path.lexists(build):  # interrupted just after the new one went in
                _remove(aside)
                raise
            if not os.path.lexists(dst) and os.path.lexists(aside):
                os.rename(aside, dst)
            # ENOTEMPTY/EEXIST: a reader restored the old one meanwhile (recover_dir); set it aside again
            if not (isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST) and attempt < 2):
                raise
    fsync_dir(dst.parent)
    _remove(aside)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """Persist every file under ``root`` and every folder's entries."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def list_files(root: Path, *, skip: Sequence[str] = (), hash_max_bytes: int | None = None,
               hash_names: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` but ``skip`` (paths relative to it, ``/``-separated) with its size
    and SHA-256: ``{path: {"bytes": n, "sha256": hex}}``. With ``hash_max_bytes``, a larger file not
    named in ``hash_names`` is listed by size alone (RocksDB's tables, which carry block checksums
    of their own, in a checkpoint of any size)."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for name in sorted(names):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in skip:
                continue
            size = p.stat().st_size
            files[rel] = {"bytes": size}
            if hash_max_bytes is None or size <= hash_max_bytes or name in hash_names:
                files[rel]["sha256"] = _sha256(p)
    return files


def write_manifest(root: Path, what: str = "output") -> dict[str, Any]:
    """Write :data:`MANIFEST` into ``root``, last: a new id and every file's size and SHA-256
    (:func:`list_files`).

    Returns:
        The manifest written.
    """
    manifest = {"format": MANIFEST_FORMAT, "id": uuid.uuid4().hex, "what": what, "written": time.time(),
                "files": list_files(root, skip=(MANIFEST,))}
    with atomic_file(root / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def check_files(root: Path, files: dict[str, Any], what: str, fix: str, shown: str | None = None,
                listed_in: str = MANIFEST) -> None:
    """Check that each file of a :func:`list_files` listing is under ``root`` with its size and,
    where listed, its SHA-256.

    Raises:
        DamagedOutputError: one line naming the first file that differs and how.
    """
    def name(rel: str) -> str:
        return f"{shown} (member {rel})" if shown else str(root / rel)

    base = os.path.realpath(root)
    for rel, entry in files.items():
        p = root / rel
        if os.path.isabs(rel) or os.path.commonpath([base, os.path.realpath(p)]) != base:
            raise DamagedOutputError(f"{root / listed_in} names a file outside its folder ({rel[:60]!r}); {fix}")
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise DamagedOutputError(f"{name(rel)} is missing: the {what} is incomplete (its {listed_in} lists "
                                     f"it); {fix}") from None
        if size != entry.get("bytes"):
            raise DamagedOutputError(f"{name(rel)} has {size} bytes, its {listed_in} says {entry.get('bytes')}: a "
                                     f"file of another write of the {what}, or cut short; {fix}")
        if "sha256" in entry and _sha256(p) != entry["sha256"]:
            raise DamagedOutputError(f"{name(rel)} does not belong to this {what}: its SHA-256 differs from "
                                     f"the one in its {listed_in} (a file of another write, or damaged); {fix}")


def verify_manifest(root: str | os.PathLike[str], what: str, required: Sequence[str] = (),
                    fix: str = "write it again", shown: str | None = None) -> dict[str, Any] | None:
    """Check that ``root``'s :data:`MANIFEST` lists every ``required`` file and that each file it
    lists is there with its size and SHA-256: the parts are those of one complete write.

    A folder without a manifest (written by a version before manifests) is accepted with a
    logged warning: None is returned and the caller checks what it can without one.

    Args:
        root: the folder.
        what: the output's name in messages ("ONNX export").
        required: files the reader will load.
        fix: what to do, ending each message.
        shown: how to name ``root`` in messages (a file the folder was unpacked from).
    Raises:
        DamagedOutputError: one line naming the file and the cause.
    """
    root = Path(root)

    def name(rel: str) -> str:
        return f"{shown} (member {rel})" if shown else str(root / rel)

    mp = root / MANIFEST
    if not os.path.lexists(mp):
        log.warning("%s has no %s (written by an earlier version): its files are not checked to belong "
                    "together; %s to add one", shown or root, MANIFEST, fix)
        return None
    try:
        manifest = json.loads(mp.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError("'files' is not an object of objects")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedOutputError(f"{name(MANIFEST)} is unreadable ({str(e)[:80]}): the {what} is damaged; "
                                 f"{fix}") from None
    for rel in required:
        if rel not in files:
            raise DamagedOutputError(f"{name(rel)} is not one of the files its {MANIFEST} lists: the {what} "
                                     f"is incomplete or mixed; {fix}")
    check_files(root, files, what, fix, shown)
    return manifest


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, markers: Sequence[str] = (), what: str = "output",
               manifest: bool = True) -> Iterator[Path]:
    """Build the folder ``path`` in a hidden sibling and swap it in whole (see the module doc).

    Yields the empty build folder. When the block ends, :data:`MANIFEST` is written into it last
    (unless ``manifest`` is false: a folder that changes after, a store), every file is fsynced,
    and :func:`swap_dir` puts it at ``path``. On an exception the build folder is removed and
    ``path`` is untouched.

    Args:
        path: the destination folder (its parent is created).
        markers: files of which one shows that an existing ``path`` is an output of this kind,
            which may be replaced (:func:`check_replaceable`, checked before the block runs).
        what: the output's name in messages.
        manifest: write :data:`MANIFEST`.
    Raises:
        ValueError: ``path`` holds something else.

    Example:
        >>> import tempfile; from pathlib import Path
        >>> out = Path(tempfile.mkdtemp()) / "export"
        >>> with atomic_dir(out, markers=("a.txt",), what="test output") as build:
        ...     _ = (build / "a.txt").write_text("new")
        >>> sorted(p.name for p in out.iterdir())
        ['MANIFEST.json', 'a.txt']
    """
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dst)
    check_replaceable(dst, markers, what)
    remove_leftovers(dst.parent, _leftover_dirs(dst, "build"))
    build = dst.with_name(f".{dst.name}.build-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    build.mkdir()
    try:
        yield build
        if manifest:
            write_manifest(build, what)
        fsync_tree(build)
        check_replaceable(dst, markers, what)  # nothing else moved in while it was built
        swap_dir(build, dst)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


@contextmanager
def scratch_dir(beside: str | os.PathLike[str]) -> Iterator[Path]:
    """A hidden folder beside ``beside`` (same file system as the output, so a rename out of it
    is atomic), removed when the block ends; one that a killed process left is removed by the
    next."""
    b = Path(beside)
    b.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(b.parent, _leftover_dirs(b, "scratch"))
    d = b.with_name(f".{b.name}.scratch-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_whole(path: str | os.PathLike[str], load: Callable[[Path], T], what: str) -> T:
    """``load(folder)`` of the folder at ``path`` (after :func:`recover_dir`), run again if a
    writer swapped another folder in while it ran, so that every part loaded comes from one.

    Raises:
        DamagedOutputError: it was replaced three times in a row while being read.
    """
    for _ in range(3):
        folder = recover_dir(path)
        before = _identity(folder)
        out = load(folder)
        if _identity(folder) == before:
            return out
    raise DamagedOutputError(f"{path} was replaced three times while it was read (a writer busy on the {what}?); "
                             "read it again when the write is done")
