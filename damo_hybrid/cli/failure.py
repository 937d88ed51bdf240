"""The command line's one error boundary: an exception a command raised becomes an exit status
and one line naming the file and the cause (:func:`explain`); only a bug shows a traceback.

Exit statuses (documented in ``docs/cli.md`` and ``docs/troubleshooting.md``):

====  =====================================================================================
0     did what was asked
1     ran, but the check it was asked for failed (a benchmark outside its budget)
2     bad arguments, config or input, or a refusal (a mismatch, a damaged file, a too-small
      budget): nothing to retry until the command line or the files change
3     the system refused: disk full, read-only file system, permission, out of memory, a
      resource limit (too many open files), or another rank of the run stopped
70    an internal bug: a traceback, then one line asking to report it
130   interrupted (SIGINT, Ctrl-C); 143: terminated (SIGTERM)
141   the reader of its output went away (``| head``): stopped quietly, as a process that
      SIGPIPE ends (128 + 13), so ``set -o pipefail`` sees what it sees of ``cat`` or ``grep``
====  =====================================================================================

Prints nothing itself: :func:`damo_hybrid.cli.main` prints what it returns.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import DamoHybridError, ExchangeError, OutOfSpaceError, PipelineError

__all__ = ["OK", "CHECK_FAILED", "REFUSED", "SYSTEM", "BUG", "SIGINT", "SIGTERM", "SIGPIPE", "MAX_LINE", "Failure", "explain",
           "path_in", "broken_pipe", "reader_gone", "system_refusal"]

OK = 0
CHECK_FAILED = 1
REFUSED = 2
SYSTEM = 3
BUG = 70  # EX_SOFTWARE (sysexits.h)
SIGINT = 130
SIGTERM = 143
SIGPIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader closed the pipe
MAX_LINE = 300  # characters of the whole line on stderr, the "damo-hybrid <cmd>: error: " prefix included

# errnos that mean the system refused (what to do, after the cause)
_SYSTEM_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "free space there, or write elsewhere",
    errno.EDQUOT: "free space within the quota, or write elsewhere",
    errno.EROFS: "give a path on a writable file system",
    errno.EACCES: "give a path this user may use, or change its permissions",
    errno.EPERM: "give a path this user may use, or change its permissions",
    errno.ENOMEM: "lower --batch-size or --cache-mb, or free memory",
    errno.EMFILE: "raise the limit of open files (ulimit -n)",
    errno.ENFILE: "raise the system's limit of open files",
    errno.EFBIG: "the file system or a limit (ulimit -f) refuses a file this large",
    errno.EIO: "the disk or its file system failed: check it (dmesg)",
}
_OS_ERROR = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
_STRERRORS = {os.strerror(n).lower(): n for n in _SYSTEM_ERRNOS}
_TORCH_OOM = ("can't allocate memory", "out of memory", "cannot allocate memory")
# a hidden temp file of storage.files.atomic_file: name the file the user asked for instead
_TMP_NAME = re.compile(r"(?<![^/\s'\"(])\.([^/\s'\"]+)\.[0-9a-f]{32}\.tmp")
# what a damaged file raises where its reader does not name it (the boundary adds the path it has)
_DAMAGED = (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, tarfile.TarError)


@dataclass(frozen=True)
class Failure:
    """What the command line does with an exception: exit ``status`` and print ``line`` (one line,
    without the ``damo-hybrid <cmd>: error: `` prefix); ``bug``: print the traceback first."""

    status: int
    line: str
    bug: bool = False


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from (its cause, else its unsuppressed context)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(seen) < 16:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ if cur.__cause__ is not None else (None if cur.__suppress_context__ else cur.__context__)


def broken_pipe(e: BaseException) -> bool:
    """Whether ``e`` is, or was raised from, a write to a pipe whose reader is gone (``| head``)."""
    return any(isinstance(x, BrokenPipeError) for x in _chain(e))


def reader_gone() -> int:
    """What the boundary does where the reader of stdout went away (``| head``): stop quietly, as
    ``cat`` or ``grep`` do, printing nothing more (no error line: the reader asked for no more),
    with stdout pointed at /dev/null so that the interpreter's flush at exit does not fail a second
    time. Returns :data:`SIGPIPE` (141), what a shell reports for a writer that SIGPIPE ended,
    not 0: the command may have stopped before its work was done (a ``train`` printing progress)."""
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (a caller captures it)
        pass
    return SIGPIPE


def _name(path: object) -> str:
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return _TMP_NAME.sub(r"\1", text)


def _system_errno(e: BaseException) -> int | None:
    """The errno of a system refusal ``e`` is, or reports in its text (RocksDB's errors); None if none."""
    if isinstance(e, OSError) and e.errno in _SYSTEM_ERRNOS:
        return e.errno
    if isinstance(e, OutOfSpaceError):
        return errno.ENOSPC
    if isinstance(e, MemoryError):
        return errno.ENOMEM
    if isinstance(e, (DamoHybridError, RuntimeError, OSError)):
        text = str(e).lower()
        for m in _OS_ERROR.finditer(text):
            n = int(m.group(1) or m.group(2))
            if n in _SYSTEM_ERRNOS:
                return n
        for s, n in _STRERRORS.items():
            if s in text:
                return n
        if type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and any(s in text for s in _TORCH_OOM)):
            return errno.ENOMEM
    return None


def system_refusal(e: BaseException) -> int | None:
    """The errno where ``e`` or what it was raised from is the system's refusal (a full disk, a
    read-only file system, permission, memory): a reason to stop, never evidence that a file is
    damaged; None otherwise."""
    return next((n for x in _chain(e) if (n := _system_errno(x)) is not None), None)


def _expected(e: BaseException) -> bool:
    if isinstance(e, PipelineError) and e.__cause__ is not None:
        return _expected(e.__cause__)  # a stage's own bug stays a bug
    if isinstance(e, ImportError):  # a package not installed; a name missing in this one is a bug
        return isinstance(e, ModuleNotFoundError) and not str(e.name or "").startswith("damo_hybrid")
    return isinstance(e, (DamoHybridError, OSError, ValueError, TypeError, MemoryError, *_DAMAGED))


def _os_line(e: OSError, path: str | None) -> str:
    files = [_name(f) for f in (e.filename, e.filename2) if f is not None]
    cause = e.strerror or str(e)
    where = " -> ".join(files) if files else (f"({path})" if path else "")
    line = f"{where}: {cause}" if files else f"{cause} {where}".strip()
    hint = _SYSTEM_ERRNOS.get(e.errno or 0)
    return f"{line}: {hint}" if hint else line


def _text(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _one_line(text: str, room: int) -> str:
    text = _TMP_NAME.sub(r"\1", " ".join(text.split()))
    return text if len(text) <= room else text[:room - 1].rstrip() + "…"


def path_in(args: Any) -> str | None:
    """The file or folder a command writes (or else reads), as ``--option PATH``: an error that
    names no file (a full disk under a write) names this one."""
    for opt in ("onnx", "out", "store", "dir", "json"):
        v = getattr(args, opt, None)
        if isinstance(v, str) and v:
            return f"--{opt} {v}"
    return None


def explain(e: BaseException, cmd: str | None = None, path: str | None = None) -> Failure:
    """The exit status and line of exception ``e`` raised by command ``cmd``.

    Args:
        e: what the command raised (not a KeyboardInterrupt: the caller handles signals).
        cmd: the subcommand, for the line's length budget (``None`` before arguments parse).
        path: what the command was reading or writing, as ``--option PATH``: named where the
            exception names no file (a write to a full disk, say).
    """
    room = MAX_LINE - 1 - len(f"damo-hybrid {cmd}: error: " if cmd else "damo-hybrid: error: ")
    chain = list(_chain(e))
    refusal = next(((x, n) for x in chain if (n := _system_errno(x)) is not None), None)
    if refusal is not None:  # the system refused, whatever wraps it
        x, n = refusal
        if isinstance(e, OSError):
            line = _os_line(e, path)
        elif isinstance(e, DamoHybridError):  # names the store or file already
            line = _text(e)
            if not isinstance(e, (OutOfSpaceError, MemoryError)):  # those say what to do
                if os.strerror(n).lower() not in line.lower():
                    line += f" ({os.strerror(n)})"
                line += f": {_SYSTEM_ERRNOS[n]}"
        elif isinstance(x, OSError):
            line = _os_line(x, path)
        elif n == errno.ENOMEM:
            line = f"out of memory ({type(x).__name__}{': ' + str(x) if str(x) else ''}): {_SYSTEM_ERRNOS[n]}"
        else:
            line = f"{_text(x)}{f' ({path})' if path else ''}: {_SYSTEM_ERRNOS[n]}"
        return Failure(SYSTEM, _one_line(line, room))
    lost = next((x for x in chain if isinstance(x, ExchangeError)), None)
    if lost is not None:  # another rank stopped: the system's doing, as the launcher of ranks says too
        return Failure(SYSTEM, _one_line(_text(lost), room))
    if _expected(e):
        if isinstance(e, OSError):
            line = _os_line(e, path)
        elif isinstance(e, ImportError):
            line = f"{_text(e)}: install the package it names (the README lists the extras: data, serve, gpu, plot)"
        elif isinstance(e, _DAMAGED):
            line = f"{path + ': ' if path else ''}a damaged file ({type(e).__name__}: {_text(e)})"
        else:
            line = _text(e)
        return Failure(REFUSED, _one_line(line, room))
    return Failure(BUG, _one_line(f"internal error ({type(e).__name__}: {_text(e)}); this is a bug: please report "
                                  "it with the command line and the traceback above", room), bug=True)
