"""SIGTERM handled like Ctrl-C: the pipeline's stages stop, the store is flushed, temporary
stores are removed, and the command exits 143.

Both signals raise their exception in the main thread at the next Python instruction, except
inside the JIT compiler (numba and llvmlite): llvmlite runs Python callbacks from native code,
and an exception raised in one leaves LLVM with a half-written buffer, which crashed the process
(a segmentation fault instead of exit 143). There the signal is delivered again 50 ms later, so
the interrupt lands once the compiler is back in plain Python. A signal still deferred when the
block ends is not sent again (the command has finished and flushed by then): the block's
:class:`Late` says so, and the command exits with the signal's status.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Late", "Terminated", "sigterm_as_interrupt"]

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


class Late:
    """Signals deferred inside the JIT compiler and not yet delivered, with their retry timers."""

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.timers: list[threading.Timer] = []
        self.open = True

    def defer(self, signum: int) -> None:
        self.pending.add(signum)
        t = threading.Timer(_RETRY_S, self._again, (signum,))
        t.daemon = True  # never holds the interpreter's exit
        self.timers.append(t)
        t.start()

    def _again(self, signum: int) -> None:
        if self.open and signum in self.pending:
            os.kill(os.getpid(), signum)

    def close(self) -> None:
        self.open = False
        for t in self.timers:
            t.cancel()
        self.timers.clear()

    def exit_code(self, rc: int) -> int:
        """``rc``, or the status of a signal that arrived too late to interrupt (143, 130)."""
        if signal.SIGTERM in self.pending:
            return 143
        return 130 if signal.SIGINT in self.pending else rc


_late: Late | None = None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _in_compiler(frame):
        (_late or Late()).defer(signum)
        return
    if _late is not None:
        _late.pending.discard(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def sigterm_as_interrupt() -> Iterator[Late]:
    """Within the block, SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt`` in the
    main thread, outside the JIT compiler (elsewhere: no-op). Yields the block's :class:`Late`."""
    global _late
    late = Late()
    if threading.current_thread() is not threading.main_thread():
        yield late
        return
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    outer, _late = _late, late
    try:
        yield late
    finally:
        late.close()
        _late = outer
        for s, h in previous.items():
            signal.signal(s, h)
