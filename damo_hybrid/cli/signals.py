"""SIGTERM handled like Ctrl-C: the pipeline's stages stop, the store is flushed, temporary
stores are removed, and the command exits 143.

Both signals raise their exception in the main thread at the next Python instruction, except
inside the JIT compiler (numba and llvmlite): llvmlite runs Python callbacks from native code,
and an exception raised in one leaves LLVM with a half-written buffer, which crashed the process
(a segmentation fault instead of exit 143). There the signal is delivered again 50 ms later, so
the interrupt lands once the compiler is back in plain Python.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Terminated", "sigterm_as_interrupt"]

_COMPILER = ("numba", "llvmlite")
_RETRY_S = 0.05


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so every cleanup path of Ctrl-C runs for it too."""


def _in_compiler(frame: FrameType | None) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_COMPILER):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _in_compiler(frame):
        threading.Timer(_RETRY_S, os.kill, (os.getpid(), signum)).start()
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt`` in the
    main thread, outside the JIT compiler (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
